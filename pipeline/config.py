"""Typed config schemas (registered in Hydra's ConfigStore) and start-up validation.

`conf/config.yaml` names `pipeline_schema` first in its defaults list, so every key a user sets
is checked against these dataclasses: a misspelt key or a wrong type fails before any work.
Each technique's options are its own dataclass, stored as `schema/technique/<name>` by
`register_configs()`; the technique's YAML file pulls that schema in. A data source or model
family with keys of its own does the same with a DataConfig / ModelConfig subclass
(`schema/data/<name>`, `schema/model/<name>`); `model.kind` and `data.kind` name registered
families and sources (pipeline/families, pipeline/data).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING

from pipeline.errors import ConfigError  # noqa: F401 - re-exported: pipeline.config.ConfigError

def _conf_dir() -> Path:
    """The Hydra configs: `pipeline/conf` in an installed wheel (shipped from the checkout's
    top-level `conf/`, the source of truth), else `conf/` beside the package (a source checkout or
    an editable install)."""
    package = Path(__file__).resolve().parent
    shipped = package / "conf"
    return shipped if (shipped / "config.yaml").is_file() else package.parent / "conf"


CONF_DIR = _conf_dir()


@dataclass
class ModelConfig:
    kind: str = MISSING  # a registered model family (pipeline/families): efficientnet_lite0, torchvision, ...
    name: Optional[str] = None  # torchvision / timm model name
    weights: Optional[str] = None  # torchvision weights name (DEFAULT, IMAGENET1K_V1, null)
    pretrained: bool = False  # timm: fetch pretrained weights through timm's own cache
    path: Optional[str] = None  # checkpoint file (state dict or TorchScript)
    arch: Optional[str] = None  # checkpoint architecture: torchvision/timm name or "module:Class"
    num_classes: Optional[int] = None  # checkpoint architecture's number of classes
    # Preprocessing; null: the model's own (torchvision weights' transforms, timm's pretrained
    # config), else ImageNet's 224 / 256 / mean / std.
    input_size: Optional[int] = None  # side of the square crop the model sees
    resize: Optional[int] = None  # shorter side is resized to this, then centre-cropped to input_size
    interpolation: str = "area"  # area | bilinear | bicubic (area is used for shrinking)
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    layers: List[str] = field(default_factory=list)  # default layers; empty: last conv block


@dataclass
class DataConfig:
    kind: str = MISSING  # a registered data source (pipeline/data): samples, folder, video, ...
    path: Optional[str] = None
    start: int = 0  # video frame range
    stop: Optional[int] = None
    step: int = 1  # frames mode: every step-th frame is one input
    clip_len: Optional[int] = None  # clips mode (3D CNNs): frames per clip; null: one frame per input
    frame_stride: int = 1  # clips mode: distance between a clip's frames
    clip_stride: int = 16  # clips mode: distance between the first frames of consecutive clips
    extensions: List[str] = field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"]
    )
    crop: Optional[List[int]] = None  # [x, y, w, h] in the source image's pixels
    annotations: Optional[str] = None  # labels / boxes: a CSV id,class,x,y,w,h, a Pascal VOC folder or a COCO JSON
    limit: Optional[int] = None
    max_pixels: Optional[int] = 100_000_000  # larger images (by their header) are skipped; null: no limit
    reduced_decode: bool = True  # decode large JPEGs at 1/2, 1/4, 1/8 size when the model needs far fewer pixels
    shard: str = "auto"  # i/n: this job's block of the inputs | auto: from a Slurm job array | all


@dataclass
class RenderConfig:
    png: bool = True
    max_inputs: Optional[int] = 256  # PNGs for the first N inputs of the run only
    colormap: str = "jet"  # any OpenCV colormap name
    alpha: float = 0.5  # heatmap opacity over the image
    channels: int = 8  # top channels drawn per layer for channel maps
    tile: int = 160  # tile side in pixels
    frames: int = 8  # clips: frames drawn per row, evenly spaced over the clip
    gallery_columns: int = 16  # data-free techniques: tiles per row of png/<technique>.png


@dataclass
class EvaluateConfig:
    deletion: bool = False  # deletion curve + AUC per heatmap (Petsiuk et al. 2018)
    insertion: bool = False  # insertion curve + AUC per heatmap
    steps: int = 16  # points of the deletion / insertion curves
    sanity: bool = False  # cascading model-randomization check (Adebayo et al. 2018)
    sanity_steps: int = 4  # cumulative groups of layers re-initialized from the top
    pointing: bool = False  # pointing game + energy pointing per heatmap, against data.annotations' boxes
    pointing_tolerance: int = 15  # px (model input) around the map's maximum that count as a hit
    road: bool = False  # ROAD MoRF / LeRF curves, AUCs, combined (Rong et al. 2022; images only)
    road_percentages: List[int] = field(default_factory=lambda: list(range(10, 100, 10)))  # % of pixels removed
    confidence: bool = False  # average drop + increase in confidence (Chattopadhyay et al. 2018)
    sparseness: bool = False  # Gini index of |map| (Chalasani et al. 2020)


@dataclass
class StoreConfig:
    dtype: str = "float32"  # float32 | float16: floating-point maps in maps.h5 (float16: half the bytes)


@dataclass
class ScoreConfig:
    """What a class score is for a model that is not a classifier (pipeline/scores.py)."""

    region: Optional[List[int]] = None  # segmentation: [x, y, w, h] (model-input px) each class's logits are summed over; null: its predicted mask
    min_score: float = 0.5  # detection: boxes of the clean input explained (the top k, target=topk:k) score at least this
    iou: float = 0.5  # detection: a detection matches a box with the same label and at least this IoU


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    technique: Dict[str, Any] = field(default_factory=dict)
    layers: List[str] = II("model.layers")  # module names or glob patterns
    layout: str = "auto"  # auto | nchw | nhwc | tokens: how the layers' outputs are read as maps (pipeline/layouts.py)
    target: str = "pred"  # pred | label | <int> | topk:<k> | "<class name>" | similar:<image path>
    score: ScoreConfig = field(default_factory=ScoreConfig)  # class scores of segmentation models
    batch_size: int = 16
    max_batch: int = II("batch_size")  # memory budget: most rows per forward when a technique expands a batch
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    num_workers: int = 2
    keep_freed_memory: bool = True  # glibc keeps freed memory for the next batch (pipeline/allocator.py)
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast for the no-grad perturbation forwards (pipeline/precision.py)
    pin_memory: Optional[bool] = None  # page-locked batches for asynchronous copies to the GPU (null: when on CUDA)
    render: RenderConfig = field(default_factory=RenderConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    store: StoreConfig = field(default_factory=StoreConfig)


PRECISIONS = ("fp32", "bf16", "fp16")
_TOPK = re.compile(r"^topk:[1-9]\d*$")


def register_configs() -> None:
    """Store the top-level schema, every registered technique's option schema, the schemas of the
    data sources and model families that have keys of their own, and the submitit launcher
    configs (pipeline/launchers.py)."""
    from pipeline.launchers import register_launchers
    from pipeline.techniques import REGISTRY

    register_launchers()
    cs = ConfigStore.instance()
    cs.store(name="pipeline_schema", node=Config)
    for name, technique in REGISTRY.items():
        cs.store(group="schema/technique", name=name, node=technique.Options)
    for group, base, schemas in (("data", DataConfig, source_schemas()), ("model", ModelConfig, family_schemas())):
        for name, schema in schemas.items():
            if not (isinstance(schema, type) and issubclass(schema, base)):
                raise TypeError(f"the schema of {group} {name!r} must be a dataclass subclassing {base.__name__}")
            cs.store(group=f"schema/{group}", name=name, node=schema)


def source_schemas() -> Dict[str, type]:
    """{data.kind: its DataConfig subclass}, for the registered sources that have one."""
    from pipeline.data import SOURCES

    return {name: cls.schema for name, cls in SOURCES.items() if cls.schema is not None}


def family_schemas() -> Dict[str, type]:
    """{model.kind: its ModelConfig subclass}, for the registered families that have one."""
    from pipeline.families import SCHEMAS

    return dict(SCHEMAS)


TILE_RANGE = (32, 1024)  # render.tile: below 32 px a titled tile is unreadable
MAX_CHANNELS = 64  # render.channels: one PNG row is channels + 1 tiles wide
SEED_MAX = 2**32 - 1  # numpy's seed range (seed_everything calls np.random.seed)
_INDEX = re.compile(r"^[+-]?\d+$")


def colormap_names() -> List[str]:
    """The colormaps OpenCV knows (cv2.COLORMAP_<NAME>), lower case."""
    import cv2

    return sorted(name[len("COLORMAP_"):].lower() for name in dir(cv2) if name.startswith("COLORMAP_"))


def _check_ranges(cfg: Any) -> None:
    """Value ranges of render.*, seed, target indices and model.num_classes: each would otherwise
    fail (or write an absurd PNG) only after rows are written."""
    r = cfg.render
    if str(r.colormap).lower() not in colormap_names():
        raise ConfigError(f"render.colormap={r.colormap!r} is not an OpenCV colormap; "
                          f"known: {', '.join(colormap_names())}")
    if not TILE_RANGE[0] <= r.tile <= TILE_RANGE[1]:
        raise ConfigError(f"render.tile={r.tile}: a tile side must be {TILE_RANGE[0]}..{TILE_RANGE[1]} px "
                          f"(a smaller tile is unreadable, a larger one makes huge PNG grids)")
    if not 1 <= r.channels <= MAX_CHANNELS:
        raise ConfigError(f"render.channels={r.channels}: expected 1..{MAX_CHANNELS} channels per layer "
                          f"(each is one tile of a PNG row; the cap keeps the PNGs a sane size)")
    if r.max_inputs is not None and r.max_inputs < 0:
        raise ConfigError(f"render.max_inputs={r.max_inputs} must be 0 or more (or null: every input)")
    if not 0.0 <= r.alpha <= 1.0:  # NaN fails too
        raise ConfigError(f"render.alpha={r.alpha}: the overlay opacity must be in [0, 1]")
    if r.frames < 1:
        raise ConfigError(f"render.frames={r.frames} must be at least 1")
    if r.gallery_columns < 1:
        raise ConfigError(f"render.gallery_columns={r.gallery_columns} must be at least 1")
    if not 0 <= cfg.seed <= SEED_MAX:
        raise ConfigError(f"seed={cfg.seed}: expected 0..{SEED_MAX} (2**32 - 1, numpy's seed range)")
    target = str(cfg.target).strip()
    if _INDEX.match(target) and int(target) < 0:
        raise ConfigError(f"target={target}: a class index is 0..N-1 (N: the model's classes); "
                          "negative indices are not classes")
    if cfg.model.num_classes is not None and cfg.model.num_classes < 1:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} must be at least 1 (or null)")
    m = cfg.model
    if any(not math.isfinite(v) for v in [*(m.mean or []), *(m.std or [])]):
        raise ConfigError(f"model.mean={m.mean} / model.std={m.std}: values must be finite numbers")
    if m.resize is not None and m.resize < 8:
        raise ConfigError(f"model.resize={m.resize} must be at least 8 (or null)")
    if str(cfg.device).startswith("cuda:"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else None
        if count is not None and int(cfg.device[5:]) >= count:
            raise ConfigError(f"device={cfg.device!r} but this machine has {count} CUDA device(s): "
                              f"cuda:0..cuda:{count - 1}")


def _check_annotations(cfg: Any) -> None:
    """target=label and evaluate.pointing need data.annotations (.get: configs recorded before it)."""
    if cfg.data.get("annotations") is None:
        if str(cfg.target).strip() == "label":
            raise ConfigError("target=label explains each input's annotated class: it needs "
                              "data.annotations=FILE (a CSV id,class,x,y,w,h, a Pascal VOC folder or a COCO JSON)")
        if cfg.evaluate.get("pointing", False):
            raise ConfigError("evaluate.pointing=true scores maps against annotated boxes: it needs "
                              "data.annotations=FILE (a CSV id,class,x,y,w,h, a Pascal VOC folder or a COCO JSON)")
    if cfg.evaluate.get("pointing_tolerance", 15) < 0:
        raise ConfigError(f"evaluate.pointing_tolerance={cfg.evaluate.pointing_tolerance} must be 0 or more (px)")


def _check_road(cfg: Any) -> None:
    """evaluate.road_percentages: whole percentages 1..99, sorted, no repeats; ROAD on images only."""
    ev = cfg.evaluate
    pct = list(ev.road_percentages)
    if not pct or any(not 1 <= p <= 99 for p in pct) or pct != sorted(set(pct)):
        raise ConfigError(f"evaluate.road_percentages={pct}: expected increasing percentages in 1..99, "
                          "no repeats, e.g. [10,20,30,40,50,60,70,80,90]")
    if ev.road and cfg.data.clip_len is not None:
        raise ConfigError("evaluate.road=true needs image inputs; its imputation is 2-D "
                          f"(data.clip_len={cfg.data.clip_len} makes clips)")


def _check_score(cfg: Any) -> None:
    """score.region's shape and target=similar:PATH's file (.get: configs recorded before `score`)."""
    from pipeline.scores import check_region, similar_path

    score = cfg.get("score") or {}
    if score.get("region") is not None:
        check_region(list(score.get("region")))
    if not 0.0 <= score.get("min_score", 0.5) <= 1.0:
        raise ConfigError(f"score.min_score={score.get('min_score')}: a detection score threshold in [0, 1]")
    if not 0.0 < score.get("iou", 0.5) <= 1.0:
        raise ConfigError(f"score.iou={score.get('iou')}: an IoU threshold in (0, 1]")
    path = similar_path(cfg.target)
    if path is not None and not path:
        raise ConfigError("target=similar:PATH needs the reference image's path, e.g. target=similar:ref.jpg")
    if path and not Path(path).expanduser().is_file():
        raise ConfigError(f"target=similar:{path}: the reference image {path!r} does not exist")


def validate(cfg: Any) -> None:
    """Checks that need no model or data; raises ConfigError naming the bad key (an unknown
    model.kind or data.kind lists the registered ones)."""
    from pipeline.data import get_source
    from pipeline.families import get_family
    from pipeline.layouts import LAYOUTS

    get_family(cfg.model.kind)
    get_source(cfg.data.kind)
    if str(cfg.target).startswith("topk:") and not _TOPK.match(str(cfg.target)):
        raise ConfigError(f"target={cfg.target!r}: topk needs a whole number >= 1, e.g. topk:3")
    _check_score(cfg)
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be at least 1")
    if cfg.max_batch < 1:
        raise ConfigError(f"max_batch={cfg.max_batch} must be at least 1")
    if cfg.num_workers < 0:
        raise ConfigError(f"num_workers={cfg.num_workers} must be 0 or more")
    if cfg.layout not in LAYOUTS:
        raise ConfigError(f"layout={cfg.layout!r}: expected {', '.join(LAYOUTS[:-1])} or {LAYOUTS[-1]}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r}: expected {', '.join(PRECISIONS)}")
    if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", cfg.device):
        raise ConfigError(f"device={cfg.device!r}: expected auto, cpu, cuda or cuda:N")
    _check_ranges(cfg)
    if cfg.data.limit is not None and cfg.data.limit < 1:
        raise ConfigError(f"data.limit={cfg.data.limit} must be at least 1 (or null)")
    if cfg.data.max_pixels is not None and cfg.data.max_pixels < 1:
        raise ConfigError(f"data.max_pixels={cfg.data.max_pixels} must be at least 1 (or null: no limit)")
    if cfg.data.crop is not None:
        crop = list(cfg.data.crop)
        if len(crop) != 4 or crop[0] < 0 or crop[1] < 0 or crop[2] < 1 or crop[3] < 1:
            raise ConfigError(f"data.crop={crop}: expected [x, y, w, h] with x, y >= 0, w, h >= 1")
    if cfg.data.step < 1 or cfg.data.start < 0:
        raise ConfigError("data.start must be >= 0 and data.step >= 1")
    if cfg.data.stop is not None and cfg.data.stop <= cfg.data.start:
        raise ConfigError(f"data.stop={cfg.data.stop} must be greater than data.start={cfg.data.start}")
    m = cfg.model
    if (m.input_size is not None and m.input_size < 8) or (
            m.resize is not None and m.input_size is not None and m.resize < m.input_size):
        raise ConfigError("model.input_size must be >= 8 and model.resize >= model.input_size")
    if cfg.data.clip_len is not None and (cfg.data.clip_len < 1 or cfg.data.frame_stride < 1 or cfg.data.clip_stride < 1):
        raise ConfigError("data.clip_len, data.frame_stride and data.clip_stride must be at least 1")
    if cfg.model.interpolation not in ("area", "bilinear", "bicubic"):
        raise ConfigError(f"model.interpolation={cfg.model.interpolation!r}: area, bilinear or bicubic")
    if (m.mean is not None and len(m.mean) != 3) or (m.std is not None and (len(m.std) != 3 or min(m.std) <= 0)):
        raise ConfigError("model.mean and model.std need three values, std > 0")
    if cfg.store.dtype not in ("float32", "float16"):
        raise ConfigError(f"store.dtype={cfg.store.dtype!r}: expected float32 or float16")
    if cfg.evaluate.steps < 1 or cfg.evaluate.sanity_steps < 1:
        raise ConfigError("evaluate.steps and evaluate.sanity_steps must be at least 1")
    _check_annotations(cfg)
    _check_road(cfg)
    if not cfg.technique:
        raise ConfigError("no technique selected: set technique=<name> or technique=[a,b]")
