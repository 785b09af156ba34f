"""Receptive-field contribution maps, backward: how much each position feeds a crop of a layer's map."""
from __future__ import annotations

from dataclasses import replace
from typing import List

import torch

from pipeline.contracts import Scale
from pipeline.rf.crops import Box, box_masks, check_inside, parse_boxes
from pipeline.techniques.base import INPUT, register
from pipeline.techniques.rf_forward import SupportMaps, spatial_map


@register("rf_backward")
class RFBackward(SupportMaps):
    """Fix the deepest chosen layer L and crop k of its map (`crop` in L's map coordinates, default
    the centre unit); propagate back through the transposed box filters (the adjoint of rf_forward's
    propagation, by autograd). Per drawn layer and the input: map [N, K, h, w], the share of the
    crop's average support at each position (it sums to 1 where no padding is reached)."""

    scale = Scale.MAX

    def check_crops(self) -> None:
        h, w = self.supports[self.chosen].spatial[-2:]
        self.boxes: List[Box] = parse_boxes(self.options.crop, "crop") or [(w // 2, h // 2, 1, 1)]
        check_inside(self.boxes, h, w, f"{self.name}.crop (in {self.chosen}'s {w} x {h} map)")

    def labels(self):
        return {INPUT: "", **super().labels()}

    def draw(self):
        """Boxes on the input: the theoretical receptive field of each crop (clipped to the input)."""
        fy, fx = self.supports[self.chosen].fields[-2:]
        H, W = self.input_size()
        boxes = []
        for x, y, w, h in self.boxes:
            x0, x1 = fx.start + x * fx.jump - (fx.size - 1) / 2, fx.start + (x + w - 1) * fx.jump + (fx.size - 1) / 2
            y0, y1 = fy.start + y * fy.jump - (fy.size - 1) / 2, fy.start + (y + h - 1) * fy.jump + (fy.size - 1) / 2
            x0, y0 = max(0, round(x0)), max(0, round(y0))
            boxes.append([x0, y0, min(W - 1, round(x1)) - x0 + 1, min(H - 1, round(y1)) - y0 + 1])
        return replace(super().draw(), crop_boxes=tuple(boxes))

    def compute(self, device):
        K = len(self.boxes)
        H, W = self.input_size()
        x = torch.ones(K, 1, H, W, device=device, requires_grad=True)  # any value: the maps are linear
        h, w = self.supports[self.chosen].spatial[-2:]
        crops = box_masks(self.boxes, h, w, device=device)[:, 0]  # [K, h, w]
        crops = crops / crops.flatten(1).sum(1)[:, None, None]
        with torch.enable_grad():
            supports = self.graph.propagate(x, self.drawn)
            objective = (spatial_map(supports[self.chosen]) * crops).sum()
            tensors = [supports[layer].map for layer in self.drawn]
            grads = torch.autograd.grad(objective, [x] + tensors, allow_unused=True)
        out = {INPUT: grads[0][:, 0]}
        for layer, g in zip(self.drawn, grads[1:]):
            s = supports[layer]
            g = torch.zeros_like(s.map) if g is None else g
            out[layer] = spatial_map(s.with_map(g), reduce="sum")  # all channels' share at each position
        return out
