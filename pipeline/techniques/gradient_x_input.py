"""Gradient x input (Shrikumar et al. 2016, https://arxiv.org/abs/1605.01713)."""
from __future__ import annotations

from pipeline.contracts import Family, Kind, Output, Paper
from pipeline.techniques.base import INPUT, INPUT_GRADS, Technique, register


@register("gradxinput")
class GradientXInput(Technique):
    """The input gradient times the input, per target: map [N, K, C, (T,) H, W] and its sum over
    channels, the signed per-pixel attribution, sum [N, K, (T,) H, W] (stored, not drawn).

    Reuses the shared input gradient, so next to `saliency` no second backward runs.
    """

    family = Family.BACKPROP
    paper = Paper("Shrikumar et al. 2016", "https://arxiv.org/abs/1605.01713")
    outputs = {"map": Output(Kind.GRADIENT, "[N, K, C, (T,) H, W]"), "sum": Output(Kind.DATA, "[N, K, (T,) H, W]", doc="the sum over channels")}
    uses_layers = False
    needs = frozenset({INPUT_GRADS})

    def _attribute(self, p):
        m = p.input_grads() * p.x.unsqueeze(1)  # [N, K, C, ...] * [N, 1, C, ...]
        return {(INPUT, "map"): m, (INPUT, "sum"): m.sum(2)}
