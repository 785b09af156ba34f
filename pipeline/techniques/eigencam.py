"""Eigen-CAM (Muhammad & Yeasin 2020, https://arxiv.org/abs/2008.00299)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.techniques.base import register
from pipeline.techniques.gradcam import CAM
from pipeline.techniques.scorecam import ForwardCAM


@register("eigencam")
class EigenCAM(ForwardCAM):
    """The activations [positions x channels] of each input projected on their first principal
    direction (first right singular vector), its sign chosen so the map correlates positively with
    the channel-summed activations. Target-independent: the same map for each of the K targets.
    Returns cam [N, K, *S]."""

    @dataclass
    class Options(CAM.Options):
        center: bool = False  # subtract each channel's mean first (pytorch-grad-cam's variant)

    def layer_cam(self, p, layer, acts):
        X = acts.float().flatten(2).transpose(1, 2)  # [N, P, C]
        if self.options.center:
            X = X - X.mean(1, keepdim=True)
        v = torch.linalg.svd(X, full_matrices=False).Vh[:, 0]  # [N, C]
        v = torch.where(v.sum(1, keepdim=True) < 0, -v, v)
        cam = (X @ v[..., None]).view(acts.shape[0], 1, *acts.shape[2:])  # [N, 1, *S]
        return cam.repeat(1, p.targets.shape[1], *[1] * (acts.dim() - 2))
