"""Grad-CAM (Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391) for many layers at once."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.hooks import capture
from pipeline.techniques.base import Result, Technique, register, target_scores


@register("gradcam")
class GradCAM(Technique):
    """cam [N, K, h, w] per layer, at the layer's own resolution. All layers come from one forward
    and one backward per target; the backward stops at the shallowest chosen layer and computes
    no parameter gradient."""

    outputs = {"cam": "heatmap"}

    @dataclass
    class Options:
        relu: bool = True  # keep only positive evidence, as in the paper

    def check_layers(self, shapes):
        super().check_layers(shapes)
        for layer, shape in shapes.items():
            if len(shape) != 4:
                raise ValueError(
                    f"gradcam: layer {layer!r} outputs shape {list(shape)}; Grad-CAM needs a "
                    "feature map [N, C, h, w]"
                )

    def _attribute(self, model, x, layers, target):
        with torch.enable_grad(), capture(model, layers, grad=True) as acts:
            logits = model(x)  # [N, classes]
        targets = target.select(logits)  # [N, K]
        feats = [acts[layer] for layer in layers]  # each [N, C, h, w]
        cams = {layer: [] for layer in layers}
        for k in range(targets.shape[1]):
            grads = torch.autograd.grad(
                target_scores(logits, targets, k), feats,
                retain_graph=k < targets.shape[1] - 1, allow_unused=True,
            )
            for layer, a, g in zip(layers, feats, grads):
                if g is None:
                    raise ValueError(f"gradcam: the class score does not depend on layer {layer!r}")
                weights = g.mean((2, 3), keepdim=True)  # [N, C, 1, 1]
                cam = (weights * a.detach()).sum(1)  # [N, h, w]
                cams[layer].append(cam.clamp_min(0) if self.options.relu else cam)
        maps = {(layer, "cam"): torch.stack(cams[layer], 1) for layer in layers}  # [N, K, h, w]
        return Result(logits.detach(), targets, maps)
