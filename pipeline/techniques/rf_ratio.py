"""Receptive-field contribution maps, ratio: inside / (inside + outside) of a crop, per unit."""
from __future__ import annotations

import torch

from pipeline.techniques.base import register
from pipeline.techniques.rf_forward import SupportMaps, spatial_map


@register("rf_ratio")
class RFRatio(SupportMaps):
    """Per drawn layer map [N, K, h, w] in [0, 1]: F(crop) / (F(crop) + F(complement)), F the box-filter
    propagation of rf_forward. Away from the borders it equals rf_forward; near them padding removes
    support from both terms and the ratio counts only real pixels (0 where a unit sees only padding)."""

    def compute(self, device):
        masks = self.masks(device)
        K = masks.shape[0]
        with torch.no_grad():
            supports = self.graph.propagate(torch.cat([masks, 1 - masks]), self.drawn)
        out = {}
        for layer, s in supports.items():
            m = spatial_map(s)  # [2K, h, w]
            inside, outside = m[:K], m[K:]
            total = inside + outside
            out[layer] = torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total))
        return out
