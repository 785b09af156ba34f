"""Crop boxes `[x, y, w, h]` (one box or a list of boxes) and their masks."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

Box = Tuple[int, int, int, int]


def parse_boxes(value: Any, what: str) -> Optional[List[Box]]:
    """None, [x, y, w, h] or [[x, y, w, h], ...] -> a list of boxes (None stays None)."""
    if value is None:
        return None
    items = list(value)
    if items and all(isinstance(v, (int, float)) for v in items):
        items = [items]
    boxes: List[Box] = []
    for item in items:
        box = list(item) if isinstance(item, (list, tuple)) or hasattr(item, "__iter__") else None
        if box is None or len(box) != 4 or not all(float(v).is_integer() for v in box):
            raise ValueError(f"{what}: expected [x, y, w, h] or a list of them (integers), got {item!r}")
        x, y, w, h = (int(v) for v in box)
        if w < 1 or h < 1 or x < 0 or y < 0:
            raise ValueError(f"{what}: box {[x, y, w, h]} needs x, y >= 0 and w, h >= 1")
        boxes.append((x, y, w, h))
    if not boxes:
        raise ValueError(f"{what}: empty list of boxes")
    return boxes


def check_inside(boxes: Sequence[Box], height: int, width: int, what: str) -> None:
    for x, y, w, h in boxes:
        if x + w > width or y + h > height:
            raise ValueError(f"{what}: box [x={x}, y={y}, w={w}, h={h}] does not fit in {width} x {height}")


def centre_box(height: int, width: int, fraction: float = 0.25) -> Box:
    """A centred box `fraction` of each side (at least 1 pixel)."""
    w, h = max(1, round(width * fraction)), max(1, round(height * fraction))
    return ((width - w) // 2, (height - h) // 2, w, h)


def box_masks(boxes: Sequence[Box], height: int, width: int, device=None) -> torch.Tensor:
    """[K, 1, height, width] float: 1 inside box k, 0 outside."""
    masks = torch.zeros(len(boxes), 1, height, width, device=device)
    for k, (x, y, w, h) in enumerate(boxes):
        masks[k, :, y : y + h, x : x + w] = 1.0
    return masks
