"""Localization against annotated boxes (`evaluate.pointing`, boxes from data.annotations).

- Pointing game (Zhang et al. 2016, https://arxiv.org/abs/1608.00507): the map, upsampled to the
  model input (bilinear), is reduced to its maximum point (the first pixel in row-major order on
  ties); a hit (1) when a disc of radius `tolerance` px around that point meets a box of the target
  class (TorchRay's convention: some box pixel lies at a distance < tolerance from the point's
  pixel; tolerance 0: the point itself is in a box), else a miss (0).
- Energy pointing (Wang et al. 2020, Score-CAM, https://arxiv.org/abs/1910.01279): the share of
  the upsampled map's non-negative energy that lies inside the union of the target's boxes, in
  [0, 1]; a map with no positive value scores 0.

Boxes are (x, y, w, h) in model-input pixels (pipeline.data.boxes); a box covers the pixels it
overlaps (columns floor(x) .. ceil(x + w) - 1). Both are NaN when the input has no box of the
target class.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from pipeline.maps import resize_maps
from pipeline.store.layout import metric_output

Boxes = Sequence[Sequence[np.ndarray]]  # [N][K] float arrays [B, 4] (x, y, w, h)


def _size(input_size) -> Tuple[int, int]:
    """(H, W) from an int side or an (H, W) pair."""
    return (int(input_size), int(input_size)) if np.isscalar(input_size) else (int(input_size[0]), int(input_size[1]))


def pixel_ranges(boxes: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """[B, 4] (x, y, w, h) -> int [B, 4] (c0, r0, c1, r1), the inclusive pixel columns / rows each box
    overlaps, clipped to the (H, W) grid; a box overlapping no pixel gets c1 < c0 or r1 < r0."""
    H, W = size
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    c0 = np.clip(np.floor(b[:, 0]), 0, W - 1)
    r0 = np.clip(np.floor(b[:, 1]), 0, H - 1)
    c1 = np.clip(np.ceil(b[:, 0] + b[:, 2]) - 1, -1, W - 1)
    r1 = np.clip(np.ceil(b[:, 1] + b[:, 3]) - 1, -1, H - 1)
    empty = (b[:, 2] <= 0) | (b[:, 3] <= 0)
    c1[empty] = c0[empty] - 1
    return np.stack([c0, r0, c1, r1], 1).astype(np.int64)


def pointing_game(maps: torch.Tensor, boxes: Boxes, input_size, tolerance: float = 15) -> torch.Tensor:
    """maps [N, K, h, w], boxes [N][K] arrays [B, 4] -> float [N, K]: 1 hit, 0 miss, NaN without a box."""
    size = _size(input_size)
    N, K = maps.shape[:2]
    up = resize_maps(maps.float(), size).reshape(N, K, -1)
    flat = up.argmax(-1).cpu().numpy()  # [N, K] first maximum
    out = torch.full((N, K), math.nan)
    for n in range(N):
        for k in range(K):
            if len(boxes[n][k]) == 0:
                continue
            py, px = divmod(int(flat[n, k]), size[1])
            r = pixel_ranges(boxes[n][k], size)
            r = r[(r[:, 2] >= r[:, 0]) & (r[:, 3] >= r[:, 1])]
            dx = np.maximum(np.maximum(r[:, 0] - px, 0), px - r[:, 2])
            dy = np.maximum(np.maximum(r[:, 1] - py, 0), py - r[:, 3])
            d2 = dx * dx + dy * dy
            hit = (d2 < tolerance ** 2).any() if tolerance > 0 else (d2 == 0).any()
            out[n, k] = float(hit)
    return out


def box_mask(boxes: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """bool [H, W]: the union of the pixels the boxes overlap."""
    mask = np.zeros(size, bool)
    for c0, r0, c1, r1 in pixel_ranges(boxes, size):
        mask[r0:r1 + 1, c0:c1 + 1] = True
    return mask


def energy_pointing(maps: torch.Tensor, boxes: Boxes, input_size) -> torch.Tensor:
    """maps [N, K, h, w], boxes [N][K] arrays [B, 4] -> float [N, K] in [0, 1], NaN without a box."""
    size = _size(input_size)
    N, K = maps.shape[:2]
    energy = resize_maps(maps.float(), size).clamp_min(0).cpu()  # [N, K, H, W]
    out = torch.full((N, K), math.nan)
    for n in range(N):
        for k in range(K):
            if len(boxes[n][k]) == 0:
                continue
            total = float(energy[n, k].sum(dtype=torch.float64))
            inside = float(energy[n, k][torch.from_numpy(box_mask(boxes[n][k], size))].sum(dtype=torch.float64))
            out[n, k] = inside / total if total > 0 else 0.0
    return out


def pointing_columns(heatmaps: Dict[Tuple[str, str, str], torch.Tensor], boxes: Boxes, input_size,
                     tolerance: float) -> Dict[Tuple[str, str, str], torch.Tensor]:
    """{(technique, layer, output): maps [N, K, h, w]} -> the `<output>.pointing` and
    `<output>.energy_pointing` columns [N, K] of each."""
    out = {}
    for (name, layer, output), m in heatmaps.items():
        out[name, layer, metric_output(output, "pointing")] = pointing_game(m, boxes, input_size, tolerance)
        out[name, layer, metric_output(output, "energy_pointing")] = energy_pointing(m, boxes, input_size)
    return out
