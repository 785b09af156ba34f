"""Effective receptive field (Luo et al. 2016, https://arxiv.org/abs/1701.04128): the input gradient
of one unit of a layer, averaged over the run's inputs, beside the theoretical receptive field."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from pipeline.contracts import Draw, Family, Kind, Output, Paper, Scale
from pipeline.hooks import capture, forward
from pipeline.rf import GraphError, Support
from pipeline.techniques.base import Technique, register
from pipeline.techniques.fields import TracesFields
from pipeline.techniques.rf_forward import DISPLAY, field_label

log = logging.getLogger("pipeline")


@register("erf")
class EffectiveReceptiveField(TracesFields, Technique):
    """Per chosen layer map [N, 1, H, W]: |d u / d x| summed over colour channels, u the unit at
    `unit` = [x, y] of the layer's map (default: its centre), summed over channels (or one `channel`).
    One forward pass (stopped after the deepest layer) and one backward per layer for the whole batch.
    Its run-level summary (partial / combine / finalize: sums and counts) averages the rows of a
    run: per layer mean [H, W] and sigma [2] (x, y standard deviation in pixels of the mean map as
    a distribution); its facts are rf_box [4] (x, y, w, h of the theoretical receptive field,
    clipped to the input; -1 when the model cannot be traced) and rf [2] (its size)."""

    family = Family.RF
    paper = Paper("Luo et al. 2016", "https://arxiv.org/abs/1701.04128")
    outputs = {"map": Output(Kind.RF, "[N, 1, H, W]")}
    summary_outputs = {"mean": Output(Kind.DATA, "[H, W]", doc="the mean map"),
                       "sigma": Output(Kind.DATA, "[2]", doc="x, y spread in pixels"),
                       "rf_box": Output(Kind.DATA, "[4]", "int64", doc="x, y, w, h of the theoretical field"),
                       "rf": Output(Kind.DATA, "[2]", doc="the theoretical field's size")}
    torchscript = False
    video = False
    scale = Scale.MAX
    has_summary = True

    @dataclass
    class Options:
        unit: Optional[List[int]] = None  # [x, y] in the layer's map; null: the centre
        channel: int = -1  # -1: sum over the layer's channels
        display: str = "heatmap"  # heatmap | weighted

        def __post_init__(self):
            if self.display not in DISPLAY:
                raise ValueError(f"display={self.display!r}; expected one of {DISPLAY}")
            if self.unit is not None and len(self.unit) != 2:
                raise ValueError(f"unit={self.unit!r}; expected [x, y]")

    def __init__(self, **options):
        super().__init__(**options)
        self.units: Dict[str, Tuple[int, int]] = {}
        self.supports: Dict[str, Support] = {}

    def check_layers(self, shapes):
        super().check_layers(shapes)
        self.require_image_maps(shapes)
        for layer, shape in shapes.items():
            self.units[layer] = self.unit(layer, shape)

    def unit(self, layer: str, shape) -> Tuple[int, int]:
        """(x, y) of the chosen unit in a layer with output shape [N, C, h, w]."""
        C, h, w = shape[1:]
        x, y = self.options.unit if self.options.unit is not None else (w // 2, h // 2)
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"erf.unit=[{x}, {y}] is outside {layer!r}'s {w} x {h} map")
        if self.options.channel >= C:
            raise ValueError(f"erf.channel={self.options.channel} but {layer!r} has {C} channels")
        return x, y

    def check_model(self, model, layers) -> None:
        try:
            self.supports, example = self.layer_supports(model, layers)
            self.input_hw = tuple(example.shape[-2:])  # for the receptive-field box, clipped to the input
        except GraphError as err:
            log.warning("erf: no theoretical receptive field to draw (%s)", err)

    def _attribute(self, p):
        x = p.x.detach().requires_grad_(True)
        layers = p.layers
        with torch.enable_grad(), capture(p.model, layers, grad=True, stop=True) as acts:
            forward(p.model, x)
        out = {}
        for i, layer in enumerate(layers):
            if acts[layer].dim() != 4:
                raise ValueError(f"erf: layer {layer!r} outputs {list(acts[layer].shape)}, not [N, C, h, w]")
            if layer not in self.units:  # standalone use, without check_layers
                self.units[layer] = self.unit(layer, acts[layer].shape)
            ux, uy = self.units[layer]
            a = acts[layer][:, :, uy, ux]  # [N, C]
            unit = a.sum() if self.options.channel < 0 else a[:, self.options.channel].sum()
            (g,) = torch.autograd.grad(unit, x, retain_graph=i < len(layers) - 1)
            out[layer, "map"] = g.abs().sum(1, keepdim=True)  # [N, 1, H, W]
        return out

    input_hw: Tuple[int, int] = (224, 224)

    def rf_box(self, layer: str) -> Tuple[List[int], List[float]]:
        """(x, y, w, h) of the unit's theoretical receptive field clipped to the input, and its size."""
        s = self.supports.get(layer)
        if s is None:
            return [-1, -1, -1, -1], [-1.0, -1.0]
        fy, fx = s.fields[-2:]
        ux, uy = self.units[layer]
        H, W = self.input_hw
        cx, cy = fx.start + ux * fx.jump, fy.start + uy * fy.jump
        x0, y0 = max(0, round(cx - (fx.size - 1) / 2)), max(0, round(cy - (fy.size - 1) / 2))
        x1, y1 = min(W - 1, round(cx + (fx.size - 1) / 2)), min(H - 1, round(cy + (fy.size - 1) / 2))
        return [x0, y0, x1 - x0 + 1, y1 - y0 + 1], [fx.size, fy.size]

    def draw(self) -> Draw:
        """Each layer's tile labelled with its theoretical field's size and boxed with the field."""
        return Draw(self.options.display, self.scale,
                    labels={layer: field_label(self.supports.get(layer)) for layer in self.units},
                    layer_boxes={layer: self.rf_box(layer)[0] for layer in self.units})

    def partial(self, rows, ids):
        """Per layer the sum [H, W] (float64) and count [] of the rows' maps [R, 1, H, W]."""
        out = {}
        for (layer, _), data in rows.items():
            data = np.asarray(data, dtype=np.float64)
            out[f"{layer}/sum"], out[f"{layer}/count"] = data.sum(0)[0], np.array(len(data), dtype=np.int64)
        return out

    def finalize(self, stats):
        """Per layer the mean map [H, W] and its spread sigma [2] (x, y)."""
        out = {}
        for name in stats:
            layer, _, what = name.rpartition("/")
            if what == "sum" and int(stats[f"{layer}/count"]) > 0:
                mean = np.asarray(stats[name]) / int(stats[f"{layer}/count"])
                out[layer, "mean"] = mean.astype(np.float32)
                out[layer, "sigma"] = np.array(spread(mean), dtype=np.float32)
        return out

    def facts(self):
        """Per layer the theoretical receptive field: rf_box [4] (x, y, w, h, clipped to the input;
        -1 when the model cannot be traced) and rf [2] (its size), from the model."""
        out = {}
        for layer in self.units:
            box, size = self.rf_box(layer)
            out[layer, "rf_box"] = np.array(box, dtype=np.int64)
            out[layer, "rf"] = np.array(size, dtype=np.float32)
        return out


def spread(m: np.ndarray) -> Tuple[float, float]:
    """(x, y) standard deviation in pixels of a non-negative map taken as a distribution."""
    total = float(m.sum())
    if total <= 0:
        return 0.0, 0.0
    ys, xs = np.indices(m.shape)
    p = m / total
    mx, my = float((p * xs).sum()), float((p * ys).sum())
    return float(np.sqrt((p * (xs - mx) ** 2).sum())), float(np.sqrt((p * (ys - my) ** 2).sum()))
