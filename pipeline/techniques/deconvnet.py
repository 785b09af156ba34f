"""Deconvnet (Zeiler & Fergus 2013, https://arxiv.org/abs/1311.2901) as a ReLU backward rule."""
from __future__ import annotations

from pipeline.techniques.base import INPUT, Technique, register
from pipeline.techniques.guided_backprop import rule_input_grads


@register("deconvnet")
class Deconvnet(Technique):
    """Input gradient where each ReLU passes back relu(gradient), ignoring where its input was
    positive (the "reversed ReLU" of a deconvnet): map [N, K, C, (T,) H, W]."""

    outputs = {"map": "gradient"}
    torchscript = False
    uses_layers = False

    def _attribute(self, p):
        return {(INPUT, "map"): rule_input_grads(p, "deconvnet")}
