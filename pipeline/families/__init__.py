"""Model families by name. Importing this package imports (and so registers) every module in it."""
import importlib
import pkgutil

from pipeline.families.base import (FAMILIES, IMAGENET, SCHEMAS, Built, code_imports, get_family,
                                    imagenet_classes, register_family)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FAMILIES", "IMAGENET", "SCHEMAS", "Built", "code_imports", "get_family", "imagenet_classes",
           "register_family"]
