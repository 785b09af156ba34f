"""Guided Grad-CAM (Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391)."""
from __future__ import annotations

from pipeline.contracts import Kind, Output
from pipeline.maps import resize_maps
from pipeline.techniques.base import register
from pipeline.techniques.gradcam import GradCAM
from pipeline.techniques.guided_backprop import rule_input_grads


@register("guided_gradcam")
class GuidedGradCAM(GradCAM):
    """Guided backprop times each chosen layer's Grad-CAM, resized (bilinear, trilinear for clips)
    to the input: map [N, K, C, (T,) H, W] per layer.

    Grad-CAM comes from the shared layer pass, guided backprop from the shared "guided_grads"
    pass, so next to `gradcam` and `guided_backprop` nothing runs twice.
    """

    outputs = {"map": Output(Kind.GRADIENT, "[N, K, C, (T,) H, W]", doc="per chosen layer")}
    torchscript = False

    def _attribute(self, p):
        cams = super()._attribute(p)  # {(layer, "cam"): [N, K, *S]}
        guided = rule_input_grads(p, "guided")  # [N, K, C, *X]
        maps = {}
        for layer in p.layers:
            cam = cams[layer, "cam"]
            if cam.dim() != guided.dim() - 1:
                raise ValueError(f"{self.name}: layer {layer!r} gives maps {list(cam.shape[2:])} that "
                                 f"cannot be resized to the input's {list(guided.shape[3:])}")
            cam = resize_maps(cam, guided.shape[3:]).to(guided.dtype)  # [N, K, *X]
            maps[layer, "map"] = guided * cam.unsqueeze(2)
        return maps
