"""Technique registry. Importing this package imports (and so registers) every module in it."""
import importlib
import pkgutil

from pipeline.techniques.base import INPUT, REGISTRY, Pass, Result, Technique, get_technique, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["INPUT", "REGISTRY", "Pass", "Result", "Technique", "get_technique", "register"]
