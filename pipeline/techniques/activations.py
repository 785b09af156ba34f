"""Feature maps of the chosen layers and the most activated channels per input."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.contracts import Family, Kind, Output
from pipeline.techniques.base import ACTS, Technique, register


@register("activations")
class Activations(Technique):
    """Per layer: maps [N, C, ...] (when store_maps), mean [N, C], topk [N, k] (channel ids by mean
    activation, highest first). Layers with [N, C] outputs give maps [N, C]."""

    family = Family.ACTIVATIONS
    outputs = {"maps": Output(Kind.CHANNELS, "[N, C, ...]", doc="[N, C, (T,) h, w], or [N, C] for a vector layer"),
               "mean": Output(Kind.DATA, "[N, C]"),
               "topk": Output(Kind.DATA, "[N, k]", "int64", doc="channel ids, highest mean first")}
    needs = frozenset({ACTS})
    layouts = True

    @dataclass
    class Options:
        topk: int = 8
        store_maps: bool = True

    def check_layers(self, shapes):
        super().check_layers(shapes)
        if self.options.topk < 1:
            raise ValueError(f"activations.topk={self.options.topk} must be at least 1")

    def _attribute(self, p):
        maps = {}
        for layer, a in p.activations().items():
            a = a.float()  # [N, C, h, w] or [N, C]
            mean = a.flatten(2).mean(2) if a.dim() > 2 else a  # [N, C]
            maps[layer, "mean"] = mean
            maps[layer, "topk"] = mean.topk(min(self.options.topk, mean.shape[1]), dim=1).indices  # [N, k]
            if self.options.store_maps:
                maps[layer, "maps"] = a
        return maps
