"""Deconvnet (Zeiler & Fergus 2013, https://arxiv.org/abs/1311.2901) as a ReLU backward rule."""
from __future__ import annotations

from pipeline.contracts import Family, Kind, Output, Paper
from pipeline.techniques.base import INPUT, Technique, register
from pipeline.techniques.guided_backprop import rule_input_grads


@register("deconvnet")
class Deconvnet(Technique):
    """Input gradient where each ReLU passes back relu(gradient), ignoring where its input was
    positive (the "reversed ReLU" of a deconvnet): map [N, K, C, (T,) H, W]."""

    family = Family.BACKPROP
    paper = Paper("Zeiler & Fergus 2013", "https://arxiv.org/abs/1311.2901")
    outputs = {"map": Output(Kind.GRADIENT, "[N, K, C, (T,) H, W]")}
    torchscript = False
    uses_layers = False

    def _attribute(self, p):
        return {(INPUT, "map"): rule_input_grads(p, "deconvnet")}
