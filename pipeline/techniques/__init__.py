"""Technique registry. Importing this package imports (and so registers) every technique module in
it; `catalog()` / `describe(name)` list them (`python -m pipeline.techniques`)."""
import importlib
import pkgutil

from pipeline.contracts import Draw, Family, Kind, Output, Paper
from pipeline.techniques.base import INPUT, REGISTRY, Pass, Result, Technique, get_technique, register
from pipeline.techniques.catalog import catalog, describe

NOT_TECHNIQUES = {"base", "catalog", "__main__"}  # the modules here that register nothing

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in NOT_TECHNIQUES:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Draw", "Family", "Kind", "Output", "Paper", "INPUT", "REGISTRY", "Pass", "Result", "Technique",
           "catalog", "describe", "get_technique", "register"]
