"""Shared tensor-side resizing of maps (the picture side lives in pipeline.io.render)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def resize_maps(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[N, K, *S] -> [N, K, *size]: bilinear for 2-D maps, trilinear for 3-D (T, h, w) maps."""
    if tuple(maps.shape[2:]) == tuple(size):
        return maps
    mode = {2: "bilinear", 3: "trilinear"}[len(size)]
    n, k = maps.shape[:2]
    out = F.interpolate(maps.reshape(n * k, 1, *maps.shape[2:]).float(), size=tuple(size), mode=mode,
                        align_corners=False)
    return out.reshape(n, k, *size)


def unit_maps(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[N, K, *S] -> [N, K, *size]: each map upsampled (resize_maps) and min-max scaled to [0, 1];
    a constant map becomes 0. The mask Score-CAM and the confidence metrics multiply inputs by."""
    up = resize_maps(maps.float(), size)
    flat = up.reshape(*up.shape[:2], -1)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))).reshape(up.shape)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the last two axes (H, W), edges replicated: [..., H, W] -> same."""
    import math

    H, W = x.shape[-2:]
    radius = min(math.ceil(3 * sigma), max(H, W))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    planes = x.reshape(-1, 1, H, W)
    planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return planes.reshape(x.shape)
