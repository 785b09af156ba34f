"""Data sources (samples, folder, video) and the DataLoader that decodes them in workers."""
from pipeline.errors import ConfigError
from pipeline.data.base import BadItem, Item, Skip, Source, prepare
from pipeline.data.images import MAX_PIXELS, SAMPLES_DIR, FolderSource, SamplesSource
from pipeline.data.loader import Batch, make_loader
from pipeline.data.shard import block, parse_shard, resolve_shard
from pipeline.data.video import VideoSource


def build_source(cfg) -> Source:
    """The source a `data` config names, cut to its shard (`data.shard`, resolved: i/n or all);
    a missing path or an empty folder raises ConfigError."""
    source = _source(cfg)
    shard = parse_shard(resolve_shard(cfg.get("shard", "all")))
    if shard is not None:
        source.items = block(source.items, *shard)
        source.skipped = block(source.skipped, *shard)
    return source


def _source(cfg) -> Source:
    # .get: configs recorded in maps.h5 before these keys existed (merge rebuilds sources from them)
    decode = dict(max_pixels=cfg.get("max_pixels", MAX_PIXELS), reduced_decode=cfg.get("reduced_decode", True))
    if cfg.kind == "samples":
        return SamplesSource(cfg.limit, **decode)
    if cfg.path is None:
        raise ConfigError(f"data={cfg.kind} needs data.path")
    if cfg.kind == "folder":
        return FolderSource(cfg.path, cfg.extensions, cfg.limit, **decode)
    if cfg.kind == "video":
        return VideoSource(cfg.path, cfg.start, cfg.stop, cfg.step, cfg.limit,
                           cfg.clip_len, cfg.frame_stride, cfg.clip_stride)
    raise ConfigError(f"data.kind={cfg.kind!r} is unknown")


__all__ = [
    "BadItem", "Batch", "FolderSource", "Item", "SAMPLES_DIR", "SamplesSource", "Skip", "Source",
    "VideoSource", "block", "build_source", "make_loader", "parse_shard", "prepare", "resolve_shard",
]
