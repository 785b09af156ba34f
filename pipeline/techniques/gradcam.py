"""Grad-CAM (Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391) for many layers at once."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.contracts import Family, Kind, Output, Paper
from pipeline.maps import resize_maps
from pipeline.techniques.base import ACTS, LAYER_GRADS, Technique, register


class CAM(Technique):
    """Base of the CAM family: a map sum_c w_c A_c per layer, at the layer's own resolution.

    Subclasses override `weights` only. Returns cam [N, K, h, w] at the layer's resolution; for a
    3D layer of a video CNN, per-frame maps [N, K, T, H, W] resized (trilinear) to the clip. Activations and gradients come from the shared Pass: all layers from one forward and
    one backward per target, the backward stopping at the shallowest chosen layer, no parameter
    gradient computed.
    """

    family = Family.CAM
    outputs = {"cam": Output(Kind.HEATMAP, "[N, K, (T,) h, w]", doc="a 3D layer's maps resized to the clip")}
    needs = frozenset({ACTS, LAYER_GRADS})
    layouts = True  # ViT tokens and channels-last layers read as maps (pipeline.layouts)

    @dataclass
    class Options:
        relu: bool = True  # keep only positive evidence, as in the paper

    def check_layers(self, shapes):
        super().check_layers(shapes)
        for layer, shape in shapes.items():
            if len(shape) < 4:
                raise ValueError(f"{self.name}: layer {layer!r} outputs shape {list(shape)}; "
                                 "it needs a feature map [N, C, h, w] or [N, C, T, h, w]")

    def weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """acts [N, 1, C, *S], grads [N, K, C, *S] -> channel weights [N, K, C, *1 or *S]."""
        raise NotImplementedError

    def layer_cam(self, p, layer: str, acts: torch.Tensor) -> torch.Tensor:
        """acts [N, C, *S] -> the map before relu [N, K, *S]: sum_c weights * acts. CAMs that need
        no gradient (Score-CAM, Ablation-CAM, Eigen-CAM) override this instead of `weights`."""
        a = acts.unsqueeze(1)  # [N, 1, C, *S]
        return (self.weights(a, p.layer_grads()[layer]) * a).sum(2)  # [N, K, *S]

    def _attribute(self, p):
        maps = {}
        for layer in p.layers:
            cam = self.layer_cam(p, layer, p.activations()[layer])
            cam = cam.clamp_min(0) if self.options.relu else cam
            maps[layer, "cam"] = resize_maps(cam, p.x.shape[2:]) if cam.dim() == 5 else cam
        return maps


def spatial_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over every axis after the channel axis (2), kept as size-1 axes."""
    return t.mean(dim=tuple(range(3, t.dim())), keepdim=True)


@register("gradcam")
class GradCAM(CAM):
    """Channel weight = the gradient averaged over the map."""

    paper = Paper("Selvaraju et al. 2017", "https://arxiv.org/abs/1610.02391")

    def weights(self, acts, grads):
        return spatial_mean(grads)
