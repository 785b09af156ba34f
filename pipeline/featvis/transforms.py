"""Random transforms for robust feature visualization (Lucid's transformation robustness).

Each is a callable (image [B, 3, H, W], generators) -> image of the same shape, where
`generators[b]` is row b's own torch.Generator: every row draws its random parameters from its
own generator only, so a row's transforms do not depend on which rows share its batch, and the
whole batch is then warped in one call (one affine grid_sample per transform).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor, Sequence[torch.Generator]], torch.Tensor]


def _pick(values: Sequence[float], generators: Sequence[torch.Generator]) -> list:
    """One value of `values` per row, each drawn from that row's generator."""
    return [float(values[int(torch.randint(len(values), (1,), generator=g, device=g.device))]) for g in generators]


def _warp(image: torch.Tensor, scale, degrees, shift) -> torch.Tensor:
    """Per row b: zoom by scale[b], rotate by degrees[b] about the centre, translate by shift[b]
    = (dy, dx) pixels; same size, reflected borders, one grid_sample for the batch."""
    B, _, H, W = image.shape
    t = torch.tensor([math.radians(d) for d in degrees], dtype=image.dtype, device=image.device)
    s = torch.tensor(scale, dtype=image.dtype, device=image.device)
    d = torch.tensor(shift, dtype=image.dtype, device=image.device).view(B, 2)
    theta = torch.zeros(B, 2, 3, dtype=image.dtype, device=image.device)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(t) / s, -torch.sin(t) / s
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(t) / s, torch.cos(t) / s
    theta[:, 0, 2], theta[:, 1, 2] = -2 * d[:, 1] / W, -2 * d[:, 0] / H  # whole-pixel shifts stay exact
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def jitter(px: int) -> Transform:
    """Shift each row by up to px whole pixels each way (reflected borders)."""
    def fn(image, generators):
        if px <= 0:
            return image
        shift = [torch.randint(-px, px + 1, (2,), generator=g, device=g.device).tolist() for g in generators]
        return _warp(image, [1.0] * len(shift), [0.0] * len(shift), shift)
    return fn


def random_scale(scales: Sequence[float]) -> Transform:
    """Zoom each row by a scale picked from `scales` (e.g. [0.95, 1.0, 1.05]); the size is kept."""
    def fn(image, generators):
        if not scales:
            return image
        return _warp(image, _pick(scales, generators), [0.0] * len(generators), [(0, 0)] * len(generators))
    return fn


def random_rotate(degrees: Sequence[float]) -> Transform:
    """Rotate each row by an angle picked from `degrees` (e.g. [-5, 0, 5])."""
    def fn(image, generators):
        if not degrees:
            return image
        return _warp(image, [1.0] * len(generators), _pick(degrees, generators), [(0, 0)] * len(generators))
    return fn


def compose(*transforms: Transform) -> Transform:
    """Apply the transforms left to right with the same per-row generators."""
    def fn(image, generators):
        for t in transforms:
            image = t(image, generators)
        return image
    return fn
