"""Grad-CAM++ (Chattopadhyay et al. 2018, https://arxiv.org/abs/1710.11063)."""
from __future__ import annotations

import torch

from pipeline.contracts import Paper
from pipeline.techniques.base import register
from pipeline.techniques.gradcam import CAM


@register("gradcampp")
class GradCAMPlusPlus(CAM):
    """Channel weight = sum over the map of alpha * relu(grad), with the paper's closed-form alpha.

    With the class score passed through exp, its 2nd and 3rd derivatives are exp(score) * grad^2
    and exp(score) * grad^3; exp(score) cancels, leaving alpha = g^2 / (2 g^2 + sum_space(A) g^3)
    (0 where the denominator is 0). Returns cam [N, K, *S].
    """

    paper = Paper("Chattopadhyay et al. 2018", "https://arxiv.org/abs/1710.11063")

    def weights(self, acts, grads):
        space = tuple(range(3, grads.dim()))
        g2 = grads.square()
        denom = 2 * g2 + acts.sum(space, keepdim=True) * g2 * grads
        alpha = torch.where(denom != 0, g2 / denom, torch.zeros_like(denom))
        return (alpha * grads.clamp_min(0)).sum(space, keepdim=True)
