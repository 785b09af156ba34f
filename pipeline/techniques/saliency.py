"""Vanilla gradient saliency (Simonyan et al. 2013, https://arxiv.org/abs/1312.6034)."""
from __future__ import annotations

from pipeline.contracts import Family, Kind, Output, Paper
from pipeline.techniques.base import INPUT, INPUT_GRADS, Technique, register


@register("saliency")
class Saliency(Technique):
    """d score / d input per target: grad [N, K, C, (T,) H, W] and its max-abs over channels [N, K, (T,) H, W]."""

    family = Family.BACKPROP
    paper = Paper("Simonyan et al. 2013", "https://arxiv.org/abs/1312.6034")
    outputs = {"grad": Output(Kind.GRADIENT, "[N, K, C, (T,) H, W]"), "maxabs": Output(Kind.HEATMAP, "[N, K, (T,) H, W]", doc="the max-abs over channels")}
    uses_layers = False
    needs = frozenset({INPUT_GRADS})

    def _attribute(self, p):
        grad = p.input_grads()  # [N, K, C, ...]
        return {(INPUT, "grad"): grad, (INPUT, "maxabs"): grad.abs().amax(2)}
