"""Annotated boxes in the pixels the model sees: source pixels through data.crop, the resize of the
shorter side to `resize` and the centre crop of `input_size` (as `base.prepare_array` does)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from pipeline.data.annotations import Annotations
from pipeline.data.base import Source, resize_geometry


def input_geometry(image_wh: Tuple[int, int], crop: Optional[Sequence[int]], pre) -> Tuple[float, float, float, float]:
    """(offset x, offset y, scale x, scale y): model-input x = (source x - offset x) * scale x, as
    prepare_array computes it (the crop box, then base.resize_geometry: the rounded resize, the centre crop)."""
    W, H = image_wh
    cx, cy = (0, 0) if crop is None else (int(crop[0]), int(crop[1]))
    w, h = (W, H) if crop is None else (int(crop[2]), int(crop[3]))
    rw, rh, left, top = resize_geometry(w, h, pre)
    sx, sy = rw / w, rh / h
    return cx + left / sx, cy + top / sy, sx, sy


def input_boxes(boxes: Sequence[Sequence[float]], image_wh: Tuple[int, int], crop: Optional[Sequence[int]],
                pre) -> np.ndarray:
    """Boxes [(x, y, w, h)] in source pixels -> float32 [B, 4] (x, y, w, h) in model-input pixels,
    clipped to the input_size square; boxes left with no area inside it are dropped."""
    out = np.zeros((0, 4), np.float32)
    if len(boxes) == 0:
        return out
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    ox, oy, sx, sy = input_geometry(image_wh, crop, pre)
    S = pre.input_size
    x0 = np.clip((b[:, 0] - ox) * sx, 0, S)
    y0 = np.clip((b[:, 1] - oy) * sy, 0, S)
    x1 = np.clip((b[:, 0] + b[:, 2] - ox) * sx, 0, S)
    y1 = np.clip((b[:, 1] + b[:, 3] - oy) * sy, 0, S)
    keep = (x1 > x0) & (y1 > y0)
    if keep.any():
        out = np.stack([x0, y0, x1 - x0, y1 - y0], 1)[keep].astype(np.float32)
    return out


def batch_boxes(annotations: Annotations, source: Source, crop: Optional[Sequence[int]], pre,
                ids: Sequence[str], targets: np.ndarray) -> List[List[np.ndarray]]:
    """For each input n (by id) and target k (targets [N, K] class indices): the boxes of class
    targets[n, k] in model-input pixels, float32 [B, 4] (B may be 0). The source image size comes
    from `source.image_size` of the item `annotations.bind` kept (read only for inputs with boxes)."""
    out: List[List[np.ndarray]] = []
    for n, item_id in enumerate(ids):
        row = []
        sized = None
        for k in range(targets.shape[1]):
            boxes = [b[1:] for b in annotations.boxes_of(item_id, int(targets[n, k]))]
            if boxes and sized is None:
                sized = source.image_size(annotations.items[item_id])
            row.append(input_boxes(boxes, sized, crop, pre) if boxes else np.zeros((0, 4), np.float32))
        out.append(row)
    return out
