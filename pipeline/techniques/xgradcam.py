"""XGrad-CAM (Fu et al. 2020, https://arxiv.org/abs/2008.02312)."""
from __future__ import annotations

import torch

from pipeline.contracts import Paper
from pipeline.techniques.base import register
from pipeline.techniques.gradcam import CAM


@register("xgradcam")
class XGradCAM(CAM):
    """Channel weight = sum over the map of grad * A / sum_space(A) (0 for a channel summing to 0).

    Returns cam [N, K, *S]."""

    paper = Paper("Fu et al. 2020", "https://arxiv.org/abs/2008.02312")

    def weights(self, acts, grads):
        space = tuple(range(3, grads.dim()))
        total = acts.sum(space, keepdim=True)
        return (grads * acts).sum(space, keepdim=True) / torch.where(total != 0, total, torch.ones_like(total))
