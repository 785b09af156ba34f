"""What every data source yields, the source registry (`data.kind`), and the shared decode →
crop → resize → normalise step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import cv2
import numpy as np

from pipeline.errors import ConfigError
from pipeline.preprocess import Preprocess


@dataclass(frozen=True)
class Item:
    id: str  # stable within a source: relative path, or "<video name>@<frame>"
    source: str  # file path
    frame: int = -1  # frame index in a video; -1 for still images


@dataclass(frozen=True)
class Skip:
    id: str
    source: str
    frame: int
    reason: str


class BadItem(Exception):
    """One input that cannot be used; the run records it as skipped and goes on."""


class Source:
    """A list of items fixed at start (so resumed runs see the same ids) and a way to decode one."""

    items: List[Item]
    skipped: List[Skip]  # items known bad before decoding (e.g. frames past the end of a video)
    clip_len: Optional[int] = None  # frames per input when the items are clips (for 3D CNNs); None: images
    name: ClassVar[str]  # the data.kind it is registered as
    schema: ClassVar[Optional[type]] = None  # a pipeline.config.DataConfig subclass with its own keys

    @classmethod
    def from_config(cls, cfg: Any) -> "Source":
        """The source a `data` config (data.kind = this source's name) describes; a config that
        cannot work (a missing path, an empty folder) raises ConfigError."""
        raise NotImplementedError(f"{cls.__name__} has no from_config")

    def read(self, item: Item, min_side: Optional[int] = None) -> np.ndarray:
        """Decode one item to an RGB uint8 array [H, W, 3]; raise BadItem with the reason.

        `min_side`: the shorter side the image will be resized to (the preprocess's `resize`),
        or None; a source may then decode a large image at a reduced size that keeps its
        shorter side at least 2 x min_side (no crop box may be applied to such an image)."""
        raise NotImplementedError

    def image_size(self, item: Item) -> Tuple[int, int]:
        """(W, H) of the item's full-size image (a clip's frames), for mapping annotated boxes;
        this default decodes it (sources override it with something cheaper)."""
        image = self.read(item)
        return int(image.shape[-2]), int(image.shape[-3])


SOURCES: Dict[str, Type[Source]] = {}


def register_source(name: str, schema: Optional[type] = None):
    """Class decorator: register a Source subclass as data.kind=`name`, built by its
    `from_config(cfg)` (a duplicate name raises ValueError). `schema`: a DataConfig subclass
    typing the source's extra keys, stored as `schema/data/<name>` for its YAML to pull in."""

    def wrap(cls: Type[Source]) -> Type[Source]:
        if name in SOURCES:
            raise ValueError(f"data source {name!r} is already registered by {SOURCES[name].__module__}")
        cls.name = name
        if schema is not None:
            cls.schema = schema
        SOURCES[name] = cls
        return cls

    return wrap


def get_source(name: str) -> Type[Source]:
    """The source class registered as `name`; an unknown name raises ConfigError listing the known ones."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(f"data.kind={name!r} is unknown; known: {', '.join(sorted(SOURCES))}") from None


def required_path(cfg: Any) -> str:
    """cfg.path, or ConfigError naming the source that needs it."""
    if cfg.path is None:
        raise ConfigError(f"data={cfg.kind} needs data.path")
    return cfg.path


_INTER = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


def prepare(image: np.ndarray, crop: Optional[Sequence[int]], pre: Preprocess):
    """`prepare_array` with the model input as a torch tensor: (float [3, S, S], uint8 [S, S, 3]),
    a clip ([3, T, S, S], [T, S, S, 3])."""
    import torch  # here, not at the top: decoder workers import this module and need no torch

    x, display = prepare_array(image, crop, pre)
    return torch.from_numpy(x), display


def resize_geometry(w: int, h: int, pre: Preprocess) -> Tuple[int, int, int, int]:
    """For a w x h image (after any crop box): (width, height) once its shorter side is resized to
    `pre.resize` (never below `pre.input_size`), and the (left, top) of the centre
    `pre.input_size` square kept from it. prepare_array and the annotated boxes (pipeline.data.boxes)
    share it."""
    scale = pre.resize / min(h, w)
    rw, rh = max(pre.input_size, round(w * scale)), max(pre.input_size, round(h * scale))
    return rw, rh, (rw - pre.input_size) // 2, (rh - pre.input_size) // 2


def prepare_array(image: np.ndarray, crop: Optional[Sequence[int]], pre: Preprocess):
    """RGB uint8 [H, W, 3] -> (model input float32 [3, S, S], display image uint8 [S, S, 3]);
    a clip [T, H, W, 3] -> ([3, T, S, S], [T, S, S, 3]): `model_crop`, then `normalise`."""
    display = model_crop(image, crop, pre)
    return normalise(display, pre), display


def model_crop(image: np.ndarray, crop: Optional[Sequence[int]], pre: Preprocess) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> the crop the model sees, uint8 [S, S, 3] (a clip [T, H, W, 3] ->
    [T, S, S, 3], every frame alike): the crop box [x, y, w, h] first (it must lie inside the
    image), then the shorter side resized to `pre.resize` (area interpolation when shrinking) and
    the centre `pre.input_size` square kept."""
    if image.ndim == 4:
        return np.stack([model_crop(frame, crop, pre) for frame in image])
    if crop is not None:
        x, y, w, h = (int(v) for v in crop)
        H, W = image.shape[:2]
        if x + w > W or y + h > H:
            raise BadItem(f"crop {[x, y, w, h]} does not fit inside the {W}x{H} image")
        image = image[y : y + h, x : x + w]
    h, w = image.shape[:2]
    rw, rh, left, top = resize_geometry(w, h, pre)
    scale = pre.resize / min(h, w)
    inter = cv2.INTER_AREA if scale < 1 else _INTER.get(pre.interpolation, cv2.INTER_CUBIC)
    if inter == cv2.INTER_AREA and scale >= 1:
        inter = cv2.INTER_CUBIC
    image = cv2.resize(image, (rw, rh), interpolation=inter)
    return np.ascontiguousarray(image[top : top + pre.input_size, left : left + pre.input_size])


def normalise(display: np.ndarray, pre: Preprocess) -> np.ndarray:
    """uint8 [S, S, 3] -> (x / 255 - mean) / std, float32 [3, S, S] (a clip [T, S, S, 3] ->
    [3, T, S, S]). The loader does the same on a whole batch in torch (loader.model_input), to the
    bit."""
    x = np.moveaxis(display, -1, 0).astype(np.float32) / np.float32(255.0)
    shape = (3,) + (1,) * (x.ndim - 1)
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(shape)
    std = np.asarray(pre.std, dtype=np.float32).reshape(shape)
    return (x - mean) / std
