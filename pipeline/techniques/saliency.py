"""Vanilla gradient saliency (Simonyan et al. 2013, https://arxiv.org/abs/1312.6034)."""
from __future__ import annotations

import torch

from pipeline.techniques.base import INPUT, Result, Technique, register, target_scores


@register("saliency")
class Saliency(Technique):
    """d score / d input per target: grad [N, K, C, H, W] and its max-abs over channels [N, K, H, W]."""

    outputs = {"grad": "gradient", "maxabs": "heatmap"}
    uses_layers = False

    def _attribute(self, model, x, layers, target):
        x = x.requires_grad_(True)  # x is a detached copy made by attribute()
        with torch.enable_grad():
            logits = model(x)  # [N, classes]
        targets = target.select(logits)  # [N, K]
        grads = []
        for k in range(targets.shape[1]):
            (g,) = torch.autograd.grad(
                target_scores(logits, targets, k), x, retain_graph=k < targets.shape[1] - 1
            )
            grads.append(g)  # [N, C, H, W]
        grad = torch.stack(grads, 1)  # [N, K, C, H, W]
        return Result(logits.detach(), targets, {(INPUT, "grad"): grad, (INPUT, "maxabs"): grad.abs().amax(2)})
