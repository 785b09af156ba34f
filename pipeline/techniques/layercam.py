"""LayerCAM (Jiang et al. 2021, https://ieeexplore.ieee.org/document/9462463)."""
from __future__ import annotations

from pipeline.contracts import Paper
from pipeline.techniques.base import register
from pipeline.techniques.gradcam import CAM


@register("layercam")
class LayerCAM(CAM):
    """Element-wise weights relu(grad), not averaged over the map, so shallow layers keep their
    fine detail. Returns cam [N, K, *S]."""

    paper = Paper("Jiang et al. 2021", "https://ieeexplore.ieee.org/document/9462463")

    def weights(self, acts, grads):
        return grads.clamp_min(0)
