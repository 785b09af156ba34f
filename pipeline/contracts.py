"""Typed contracts between the techniques and the code that stores, draws and lists their results.

A technique declares each of its outputs once, with how it is drawn and its shape:

    outputs = {"cam": Output(Kind.HEATMAP, "[N, K, (T,) h, w]")}

and its `draw()` returns a `Draw` (how receptive-field maps are drawn). The runner, the writer,
the renderer, the evaluation and `python -m pipeline.techniques` read these declarations; no code
compares kind names as strings.

Shapes are written as `[d, d, ...]`, each d a symbol (N inputs, K targets, C channels, T a clip's
frames, H x W the input, h x w a layer's map, M synthesized images, or any word: `top`, `steps`), an
integer (`3`), an optional group `(T,)` (present for clips, absent for images: a shape with T is a
clip's), or a final `...` (any further axes). Symbols bind to sizes: `Output.match(shape, bound)`
checks a tensor's shape against the declaration (tests/test_contracts.py runs every technique).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from itertools import product
from typing import Dict, List, Mapping, Optional, Sequence, Tuple


class _Named(str, Enum):
    """A str Enum whose str() and format() are its value ("heatmap", not "Kind.HEATMAP")."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Kind(_Named):
    """How an output is drawn (pipeline.io.render)."""

    HEATMAP = "heatmap"  # one map per target, over the input and as the input weighted by it
    GRADIENT = "gradient"  # a signed input-space map per target: a colour and a grey image
    CHANNELS = "channels"  # feature maps: the most activated channels as a grid
    IMAGE = "image"  # an image made from each input (uint8), beside it
    TILES = "tiles"  # several images about each input (uint8), beside it
    GALLERY = "gallery"  # synthesized images of a data-free technique, png/<technique>.png
    RF = "rf"  # one map per crop, one grid across layers per crop, as `Draw` says
    DATA = "data"  # stored, not drawn
    EXAMPLES = "examples"  # a run summary's patches per channel [C, k, 3, P, P]: drawn as png/atlas/<layer>.png


class Family(_Named):
    """What kind of technique it is: groups the listing and the README's reference table."""

    ACTIVATIONS = "activations"  # what the layers output
    BACKPROP = "backprop"  # one backward pass to the input (plain or with a ReLU rule)
    ATTRIBUTION = "attribution"  # input gradients averaged over noisy copies or a path
    PERTURBATION = "perturbation"  # the score's change when parts of the input are hidden
    CAM = "cam"  # class activation maps: a weighted sum of a layer's channels
    ATTENTION = "attention"  # a transformer's attention weights, propagated through its blocks
    FEATVIS = "featvis"  # images synthesized by optimization, or weights drawn as images
    RF = "rf"  # receptive fields: geometry and effective receptive fields


class Display(_Named):
    """How a receptive-field map is drawn over the input."""

    HEATMAP = "heatmap"  # the map over the input
    WEIGHTED = "weighted"  # the input weighted by the map


class Scale(_Named):
    """How a receptive-field map is scaled to [0, 1]."""

    FRACTION = "fraction"  # fixed: the values are fractions already, so layers compare
    MAX = "max"  # each map by its maximum


@dataclass(frozen=True)
class Paper:
    cite: str  # "Selvaraju et al. 2017"
    url: str


_DIM = re.compile(r"\d+|[A-Za-z_][A-Za-z_0-9]*|\.\.\.")
_ITEM = re.compile(r"\(([^()]*)\)|([^,()\s]+)")


def parse_shape(text: str) -> List[Tuple[Tuple[str, ...], bool]]:
    """"[N, K, (T,) h, w]" -> [(("N",), False), (("K",), False), (("T",), True), ...]: groups of
    dims, each required (False) or optional (True). A bad shape raises ValueError."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError(f"shape {text!r}: expected [d, d, ...]")
    inner, groups = text[1:-1], []
    for match in _ITEM.finditer(inner):
        optional = match.group(1) is not None
        dims = tuple(d.strip() for d in (match.group(1) if optional else match.group(2)).split(",") if d.strip())
        bad = [d for d in dims if not _DIM.fullmatch(d)]
        if bad or not dims:
            raise ValueError(f"shape {text!r}: {bad or 'an empty group'} is not a size, a symbol or ...")
        groups.append((dims, optional))
    flat = [d for dims, _ in groups for d in dims]
    if "..." in flat[:-1] or (flat and flat[-1] == "..." and groups[-1][1]):
        raise ValueError(f"shape {text!r}: ... may only end the shape")
    if re.sub(r"[\s,]", "", _ITEM.sub("", inner)):
        raise ValueError(f"shape {text!r}: cannot read it")
    return groups


def shape_variants(text: str) -> List[Tuple[str, ...]]:
    """Every dims list the shape allows: "[N, (T,) h]" -> [("N", "T", "h"), ("N", "h")]."""
    groups = parse_shape(text)
    choices = [[dims] if not optional else [dims, ()] for dims, optional in groups]
    return [tuple(d for dims in pick for d in dims) for pick in product(*choices)]


def _bind(dims: Tuple[str, ...], shape: Tuple[int, ...], bound: Dict[str, int]) -> Optional[Dict[str, int]]:
    if dims and dims[-1] == "...":
        dims, shape = dims[:-1], shape[: len(dims) - 1]
        if len(shape) < len(dims):
            return None
    if len(dims) != len(shape):
        return None
    for d, n in zip(dims, shape):
        if d.isdigit():
            if int(d) != n:
                return None
        elif bound.setdefault(d, n) != n:
            return None
    return bound


@dataclass(frozen=True)
class Output:
    """One declared output: its kind, its shape (see the module docstring), its dtype when it is
    not floating point (uint8 images, int64 indices, str titles), and a note for the listing."""

    kind: Kind
    shape: str
    dtype: Optional[str] = None  # None: floating point (the model's dtype)
    doc: str = ""

    def __post_init__(self):
        object.__setattr__(self, "kind", Kind(self.kind))
        parse_shape(self.shape)

    def match(self, shape: Sequence[int], bound: Optional[Mapping[str, int]] = None) -> Optional[Dict[str, int]]:
        """The symbols' sizes (`bound` and those the shape binds) when `shape` fits the declaration
        with the sizes in `bound`, else None: "[N, K, h, w]" matches (2, 3, 8, 8) with N=2."""
        for dims in shape_variants(self.shape):
            got = _bind(dims, tuple(int(n) for n in shape), dict(bound or {}))
            if got is not None:
                return got
        return None

    def describe(self) -> str:
        """"heatmap [N, K, (T,) h, w]", with the dtype when there is one."""
        return f"{self.kind} {self.shape}" + (f" {self.dtype}" if self.dtype else "")


Box = Sequence[float]  # [x, y, w, h] in input pixels


@dataclass(frozen=True)
class Draw:
    """What the renderer needs beyond the maps (Technique.draw()): for receptive-field maps, the
    display mode and the scale, the text after each layer's name on its tile, a box per crop on
    the input tile of that crop's grid, and a box per layer on that layer's tiles; and whether a
    run-level summary's per-layer "mean" is a map to draw as png/<technique>.png (erf's is)."""

    display: Display = Display.HEATMAP
    scale: Scale = Scale.MAX
    labels: Mapping[str, str] = field(default_factory=dict)  # layer -> e.g. "RF 35"
    crop_boxes: Tuple[Box, ...] = ()  # crop k's box, on the input tile of its grid
    layer_boxes: Mapping[str, Box] = field(default_factory=dict)  # layer -> its box, on its tiles
    summary_map: bool = True  # False: the summary's "mean" is a table (e.g. class x channel), not drawn

    def __post_init__(self):
        object.__setattr__(self, "display", Display(self.display))
        object.__setattr__(self, "scale", Scale(self.scale))
        object.__setattr__(self, "crop_boxes", tuple(self.crop_boxes))
