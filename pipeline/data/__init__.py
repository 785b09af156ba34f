"""Data sources by `data.kind` (samples, folder, video, ...) and the DataLoader that decodes them in
workers. Importing this package imports (and so registers) every module in it."""
import importlib
import pkgutil

from pipeline.data.base import SOURCES, BadItem, Item, Skip, Source, get_source, prepare, register_source
from pipeline.data.images import MAX_PIXELS, SAMPLES_DIR, FolderSource, SamplesSource
from pipeline.data.loader import Batch, make_loader
from pipeline.data.shard import block, parse_shard, resolve_shard
from pipeline.data.video import VideoSource

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_source(cfg) -> Source:
    """The source a `data` config names (its registered `data.kind`), cut to its shard
    (`data.shard`, resolved: i/n or all); an unknown kind, a missing path or an empty folder
    raises ConfigError."""
    source = get_source(cfg.kind).from_config(cfg)
    shard = parse_shard(resolve_shard(cfg.get("shard", "all")))
    if shard is not None:
        source.items = block(source.items, *shard)
        source.skipped = block(source.skipped, *shard)
    return source


__all__ = [
    "BadItem", "Batch", "FolderSource", "Item", "MAX_PIXELS", "SAMPLES_DIR", "SOURCES", "SamplesSource", "Skip",
    "Source", "VideoSource", "block", "build_source", "get_source", "make_loader", "parse_shard", "prepare",
    "register_source", "resolve_shard",
]
