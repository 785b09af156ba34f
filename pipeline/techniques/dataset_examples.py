"""Dataset examples (Zeiler & Fergus 2014, https://arxiv.org/abs/1311.2901), at scale as in OpenAI
Microscope and zennit-crp: for each chosen channel of a layer, the inputs of the whole run that
excite it most (and optionally least), with the input patch under the receptive field of the unit
where it fires. Per input only the channels' scores and argmax positions are stored; the run-level
summary keeps a running top-k per channel (memory O(layers x channels x k)), which combines across
batches, resumes and shards (pipeline.summaries), and the patches are cut at the end of the run
from the inputs that made the top-k, re-decoded by id."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from pipeline.contracts import Family, Kind, Output, Paper
from pipeline.hooks import capture, forward
from pipeline.layouts import NCHW
from pipeline.rf import GraphError
from pipeline.summaries import add, keep, select
from pipeline.techniques.base import ACTS, Technique, register
from pipeline.techniques.channels import parse_channels
from pipeline.techniques.fields import TracesFields
from pipeline.techniques.example_patches import cut_patches
from pipeline.techniques.example_stats import HIST_EDGES, QUANTILE_LEVELS, histogram, quantiles

log = logging.getLogger("pipeline")
SCORES = ("max", "mean")
PATCHES = ("rf", "erf", "full")


@register("dataset_examples")
class DatasetExamples(TracesFields, Technique):
    """Per input and layer: `score` [N, C] (each chosen channel's spatial max or mean) and `argmax`
    [N, C, 2] ((y, x) of its largest unit). Run summary per layer: the `top` inputs per channel by
    score (ties by id) with their argmax, patch box and patch [C, k, 3, P, P] uint8; the `bottom`
    ones when asked; a histogram over fixed edges and quantiles of the scores; the count."""

    family = Family.ACTIVATIONS
    layouts = True  # token / channels-last layers: scores from the Pass's maps, whole-input (or erf) patches
    paper = Paper("Zeiler & Fergus 2014", "https://arxiv.org/abs/1311.2901")
    outputs = {"score": Output(Kind.DATA, "[N, C]", doc="each chosen channel's score"),
               "argmax": Output(Kind.DATA, "[N, C, 2]", "int64", doc="(y, x) of the channel's largest unit")}
    summary_outputs = {
        "channels": Output(Kind.DATA, "[C]", "int64"), "top_scores": Output(Kind.DATA, "[C, k]"),
        "top_ids": Output(Kind.DATA, "[C, k]", "object"), "top_argmax": Output(Kind.DATA, "[C, k, 2]", "int64"),
        "top_box": Output(Kind.DATA, "[C, k, 4]", "int64"),
        "top_frames": Output(Kind.DATA, "[C, k]", "int64", doc="frame index of each (-1 for images)"),
        "bottom_frames": Output(Kind.DATA, "[C, b]", "int64"),
        "top_patches": Output(Kind.EXAMPLES, "[C, k, 3, P, P]", "uint8", doc="drawn as png/atlas/<layer>.png"),
        "bottom_scores": Output(Kind.DATA, "[C, b]"), "bottom_ids": Output(Kind.DATA, "[C, b]", "object"),
        "bottom_argmax": Output(Kind.DATA, "[C, b, 2]", "int64"), "bottom_box": Output(Kind.DATA, "[C, b, 4]", "int64"),
        "bottom_patches": Output(Kind.EXAMPLES, "[C, b, 3, P, P]", "uint8"),
        "hist": Output(Kind.DATA, "[C, B]", "int64"), "hist_edges": Output(Kind.DATA, "[B1]", "float64"),
        "quantiles": Output(Kind.DATA, "[C, Q]"), "quantile_levels": Output(Kind.DATA, "[Q]", "float64"),
        "count": Output(Kind.DATA, "[]", "int64"), "field": Output(Kind.DATA, "[2, 3]", "float64"),
    }
    completed_outputs = frozenset({"top_box", "top_patches", "top_frames", "bottom_box", "bottom_patches",
                                   "bottom_frames"})
    needs = frozenset({ACTS})
    has_summary = True
    video = False
    torchscript = False

    @dataclass
    class Options:
        channels: Any = "all"  # all | a-b | 0-3,7 | [c, ...]
        top: int = 16  # inputs kept per channel
        bottom: int = 0  # also the inputs that excite each channel least
        score: str = "max"  # max | mean: of the channel's map over space
        patch: str = "rf"  # rf: under the unit's theoretical receptive field | erf: its effective one | full
        patch_size: int = 64  # P: patches are P x P

        def __post_init__(self):
            if self.score not in SCORES or self.patch not in PATCHES:
                raise ValueError(f"score={self.score!r}, patch={self.patch!r}; expected score in {SCORES}, "
                                 f"patch in {PATCHES}")
            if self.top < 1 or self.bottom < 0 or not 8 <= self.patch_size <= 512:
                raise ValueError(f"top={self.top}, bottom={self.bottom}, patch_size={self.patch_size}: "
                                 "top >= 1, bottom >= 0, 8 <= patch_size <= 512")

    def __init__(self, **options):
        super().__init__(**options)
        self.channels: Dict[str, List[int]] = {}
        self.fields: Dict[str, np.ndarray] = {}  # layer -> [2, 3] (y, x) x (start, jump, size); -1: untraced

    def check_layers(self, shapes):
        super().check_layers(shapes)
        self.require_image_maps(shapes)
        for layer, shape in shapes.items():
            self.channels[layer] = parse_channels(self.options.channels, shape[1], layer)

    def check_model(self, model, layers) -> None:
        """The theoretical receptive field of each layer (for the patches), from the model."""
        self._model = model
        self.fields = {layer: np.full((2, 3), -1.0) for layer in layers}
        other = [layer for layer in layers if self.layer_layouts.get(layer, NCHW).kind != "nchw"]
        if other:  # the receptive-field table is per [N, C, h, w] element; tokens mix every position
            log.warning("dataset_examples: %s not [N, C, h, w] (%s): their patches are whole inputs", ", ".join(other),
                        ", ".join(str(self.layer_layouts[layer]) for layer in other))
        plain = [layer for layer in layers if layer not in other]
        if not plain:
            return
        try:
            supports, _ = self.layer_supports(model, plain)
        except GraphError as err:
            log.warning("dataset_examples: no receptive fields, patches are whole inputs (%s)", err)
            return
        for layer, s in supports.items():
            self.fields[layer] = np.array([[f.start, f.jump, f.size] for f in s.fields[-2:]], dtype=np.float64)

    # -- per batch ---------------------------------------------------------------------------------
    def _attribute(self, p):
        out = {}
        for layer, a in p.activations().items():  # [N, C, h, w]
            if layer not in self.channels:  # standalone use, without check_layers
                self.channels[layer] = parse_channels(self.options.channels, a.shape[1], layer)
            a = a[:, self.channels[layer]].float()
            flat = a.flatten(2)  # [N, C, h*w]
            best = flat.argmax(2)  # [N, C]
            out[layer, "score"] = flat.amax(2) if self.options.score == "max" else flat.mean(2)
            out[layer, "argmax"] = torch.stack([best // a.shape[3], best % a.shape[3]], -1)  # [N, C, 2] (y, x)
        return out

    # -- run-level summary -------------------------------------------------------------------------
    def partial(self, rows, ids):
        out = {}
        for layer in {layer for layer, _ in rows}:
            scores = np.asarray(rows[layer, "score"], dtype=np.float64).T  # [C, R]
            argmax = np.moveaxis(np.asarray(rows[layer, "argmax"], dtype=np.int64), 0, 1)  # [C, R, 2]
            names = np.broadcast_to(np.asarray(list(ids), dtype=object), scores.shape)
            for side, k in self._sides():
                kept = keep(scores, names, k, largest=side == "top", extra={"argmax": argmax})
                out.update({f"{layer}/{side}/{key}": v for key, v in kept.items()})
            out[f"{layer}/hist"] = histogram(scores)
            out[f"{layer}/count"] = np.array(scores.shape[1], dtype=np.int64)
        return out

    def combine(self, a, b):
        out = add({k: v for k, v in a.items() if k.endswith(("/hist", "/count"))},
                  {k: v for k, v in b.items() if k.endswith(("/hist", "/count"))})
        for layer in {k.split("/")[0] for k in a if k.endswith("/count")}:
            for side, k in self._sides():
                prefix = f"{layer}/{side}/"
                out.update({prefix + key: v for key, v in select(a, b, prefix, k, largest=side == "top").items()})
        return out

    def finalize(self, stats):
        out = {}
        for layer in {k.rsplit("/", 1)[0] for k in stats if k.endswith("/count")}:
            for side, _ in self._sides():
                out[layer, f"{side}_scores"] = np.asarray(stats[f"{layer}/{side}/score"], dtype=np.float32)
                out[layer, f"{side}_ids"] = np.asarray(stats[f"{layer}/{side}/id"], dtype=object)
                out[layer, f"{side}_argmax"] = np.asarray(stats[f"{layer}/{side}/argmax"], dtype=np.int64)
            out[layer, "hist"] = np.asarray(stats[f"{layer}/hist"], dtype=np.int64)
            out[layer, "hist_edges"] = HIST_EDGES.copy()
            out[layer, "quantiles"] = quantiles(out[layer, "hist"]).astype(np.float32)
            out[layer, "quantile_levels"] = QUANTILE_LEVELS.copy()
            out[layer, "count"] = np.asarray(stats[f"{layer}/count"], dtype=np.int64)
        return out

    def facts(self):
        return {**{(layer, "channels"): np.array(c, dtype=np.int64) for layer, c in self.channels.items()},
                **{(layer, "field"): f for layer, f in self.fields.items()}}

    def complete(self, final, facts, fetch, earlier=()):
        """Each kept example's patch box [C, k, 4] and patch [C, k, 3, P, P]: taken from `earlier`
        summaries (a merge's shards) where they hold that example, else cut from the inputs that
        `fetch(ids)` re-decodes (batches of (ids, frames, display [n, S, S, 3] uint8, x [n, 3, S, S]));
        with each example's frame index [C, k] (-1 for images)."""
        return cut_patches(self, final, facts, fetch, earlier)

    def unit_grads(self, x: torch.Tensor, layer: str, units: Sequence[Tuple[int, int, int, int]]) -> np.ndarray:
        """|d unit / d input| summed over colour, [len(units), S, S], for units (row of x, channel
        index in the layer's output, y, x), each row of x at most once: one backward for all of
        them (the rows of a batch are independent in eval mode)."""
        model = self._loaded.module if self._loaded is not None else self._model
        xs = x.detach().requires_grad_(True)
        with torch.enable_grad(), capture(model, [layer], grad=True, stop=True, layout=self.layout) as acts:
            forward(model, xs)
        a = acts[layer]
        rows = [u[0] for u in units]
        total = sum(a[row, c, uy, ux] for row, c, uy, ux in units)
        (g,) = torch.autograd.grad(total, xs)
        return g[rows].abs().sum(1).cpu().numpy()

    def _sides(self):
        return [("top", self.options.top)] + ([("bottom", self.options.bottom)] if self.options.bottom else [])
