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
