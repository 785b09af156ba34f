"""Random transforms for robust feature visualization (Lucid's transformation robustness).

Each is a callable (image [B, 3, H, W], generator) -> image of the same shape, drawing its random
numbers from the explicit generator only. The optimize loop gives each row its own generator, so
a row's transforms do not depend on which other rows share its batch.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _pick(values: Sequence[float], generator: torch.Generator) -> float:
    return float(values[int(torch.randint(len(values), (1,), generator=generator, device=generator.device))])


def jitter(px: int) -> Transform:
    """Shift the image by up to px pixels each way (wrap-around roll)."""
    def fn(image, generator):
        if px <= 0:
            return image
        dy, dx = torch.randint(-px, px + 1, (2,), generator=generator, device=generator.device).tolist()
        return torch.roll(image, (dy, dx), dims=(2, 3))
    return fn


def _affine(image: torch.Tensor, scale: float, degrees: float) -> torch.Tensor:
    """Zoom by `scale` and rotate by `degrees` about the centre, same size, reflected borders."""
    t = math.radians(degrees)
    cos, sin = math.cos(t) / scale, math.sin(t) / scale
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=image.dtype, device=image.device)
    grid = F.affine_grid(theta.expand(image.shape[0], 2, 3), list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_scale(scales: Sequence[float]) -> Transform:
    """Zoom by a scale picked from `scales` (e.g. [0.95, 1.0, 1.05]); the size is kept."""
    def fn(image, generator):
        return image if not scales else _affine(image, _pick(scales, generator), 0.0)
    return fn


def random_rotate(degrees: Sequence[float]) -> Transform:
    """Rotate by an angle picked from `degrees` (e.g. [-5, 0, 5])."""
    def fn(image, generator):
        return image if not degrees else _affine(image, 1.0, _pick(degrees, generator))
    return fn


def compose(*transforms: Transform) -> Transform:
    """Apply the transforms left to right with the same generator."""
    def fn(image, generator):
        for t in transforms:
            image = t(image, generator)
        return image
    return fn
