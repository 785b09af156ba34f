"""Sparseness: the Gini index of |map| (Chalasani et al. 2020, https://arxiv.org/abs/1810.06583;
Quantus's Sparseness).

Per input and target, the map upsampled to the input (as ROAD and the confidence metrics see it),
absolute values sorted ascending a_1 <= ... <= a_n: G = sum_i (2i - n - 1) a_i / (n * sum_i a_i),
in [0, (n-1)/n]: 0 for a constant map, (n-1)/n for a single non-zero pixel. An all-zero map
counts as constant (0). Quantus adds 1e-7 to every value first; for maps much larger than 1e-7
the two agree to ~1e-6.
"""
from __future__ import annotations

import torch

from pipeline.maps import resize_maps


def gini(maps: torch.Tensor, spatial=None) -> torch.Tensor:
    """maps [N, K, *s] (upsampled to `spatial` when given) -> Gini index of |map| [N, K]."""
    if spatial is not None:
        maps = resize_maps(maps.float(), spatial)
    a = maps.reshape(*maps.shape[:2], -1).abs().double().sort(-1).values
    n = a.shape[-1]
    i = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    total = a.sum(-1)
    g = ((2 * i - n - 1) * a).sum(-1) / (n * total).clamp_min(1e-300)
    return torch.where(total > 0, g, torch.zeros_like(g)).float()
