"""Picture primitives: maps to [0, 1], colours, overlays, titled tiles, boxes and grids.

pipeline.io.render composes these into the PNGs of a run. Tiles are RGB uint8 [t, t, 3]."""
from __future__ import annotations

from typing import List, Optional, Sequence

import cv2
import numpy as np

Tile = np.ndarray  # RGB uint8 [t, t, 3]


def upsample(m: np.ndarray, size: int) -> np.ndarray:
    """[h, w] float -> [size, size] float, bilinear."""
    m = np.asarray(m, dtype=np.float32)
    if m.shape == (size, size):
        return m
    return cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR)


def normalize(m: np.ndarray, percentile: float = 100.0) -> np.ndarray:
    """Scale to [0, 1]: from 0 for a non-negative map, else from the minimum, up to the given
    percentile (values above it clip to 1). A flat map gives 0."""
    m = np.asarray(m, dtype=np.float32)
    lo = 0.0 if m.min() >= 0 else float(m.min())
    hi = float(m.max()) if percentile >= 100 else float(np.percentile(m, percentile))
    return np.clip((m - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(m)


def symmetric(m: np.ndarray) -> np.ndarray:
    """Signed map -> [0, 1] with 0 at 0.5, scaled by the 99.5th percentile of |m| (robust to spikes)."""
    scale = float(np.percentile(np.abs(m), 99.5)) or 1.0
    return np.clip(0.5 + 0.5 * m / scale, 0.0, 1.0)


def colorize(m01: np.ndarray, colormap: str = "jet") -> Tile:
    """[h, w] in [0, 1] -> RGB uint8 via an OpenCV colormap (e.g. jet, viridis, inferno, turbo)."""
    cmap = getattr(cv2, f"COLORMAP_{colormap.upper()}")
    bgr = cv2.applyColorMap(np.uint8(np.clip(m01, 0, 1) * 255), cmap)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def grey(m01: np.ndarray) -> Tile:
    g = np.uint8(np.clip(m01, 0, 1) * 255)
    return np.repeat(g[..., None], 3, axis=2)


def overlay(image: Tile, m01: np.ndarray, colormap: str, alpha: float) -> Tile:
    heat = colorize(m01, colormap).astype(np.float32)
    return np.uint8(np.clip((1 - alpha) * image + alpha * heat, 0, 255))


def weight(image: Tile, m01: np.ndarray) -> Tile:
    """The input weighted by the map (what the map lets through)."""
    return np.uint8(image.astype(np.float32) * m01[..., None])


def fit(tile: Tile, size: int) -> Tile:
    """Resize a square image to size x size (area when shrinking)."""
    if tile.shape[:2] == (size, size):
        return tile
    inter = cv2.INTER_AREA if tile.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(tile, (size, size), interpolation=inter)


LABEL_MIN_SHRINK = 0.8  # a title that would shrink below this fraction of its font size goes on two lines


def _text_width(lines: Sequence[str], font, scale: float) -> int:
    return max(cv2.getTextSize(line, font, scale, 1)[0][0] for line in lines)


def _two_lines(text: str, font, scale: float) -> Optional[List[str]]:
    """`text` split in two at a " · " separator (else at a space), the split whose longer line is
    the shortest; None when it has no place to split."""
    seps = " · " if " · " in text else " "
    parts = text.split(seps)
    if len(parts) < 2:
        return None
    splits = [[seps.join(parts[:i]), seps.join(parts[i:])] for i in range(1, len(parts))]
    if seps == " · ":  # the line break replaces the separator; keep the dot at the end of line 1
        splits = [[a + " ·", b] for a, b in splits]
    return min(splits, key=lambda lines: _text_width(lines, font, scale))


def label(tile: Tile, text: str, size: int) -> Tile:
    """Resize to size x size and write `text` on a dark strip at the top, shrunk to fit. "\n"
    breaks lines; a one-line title that would shrink below LABEL_MIN_SHRINK of its font size
    (0.32 at 160 px) is written on two lines, split at a " · " or a space, so that long titles
    stay readable."""
    tile = fit(tile, size).copy()
    font, base = cv2.FONT_HERSHEY_SIMPLEX, max(0.3, size / 400)
    room = size - 6
    lines = text.split("\n")
    scale = base * min(1.0, room / max(1, _text_width(lines, font, base)))
    if len(lines) == 1 and scale < LABEL_MIN_SHRINK * base:
        split = _two_lines(text, font, base)
        if split is not None:
            lines = split
            scale = base * min(1.0, room / max(1, _text_width(lines, font, base)))
    height = cv2.getTextSize("Ag", font, scale, 1)[0][1] if len(lines) > 1 else cv2.getTextSize(text, font, scale, 1)[0][1]
    strip = len(lines) * (height + 4) + 4
    tile[:strip] = (tile[:strip] * 0.3).astype(np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(tile, line, (3, (i + 1) * (height + 4)), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def grid(rows: Sequence[Sequence[Tile]], size: int, pad: int = 2) -> np.ndarray:
    """Rows of equal-size tiles -> one RGB image; short rows are filled with white."""
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (size + pad) + pad, cols * (size + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (size + pad), pad + j * (size + pad)
            out[y : y + size, x : x + size] = tile
    return out


def rectangle(tile: Tile, box: Sequence[float], scale: float, colour=(255, 255, 255)) -> Tile:
    """Draw box [x, y, w, h] (input pixels) on a tile drawn at `scale` tile pixels per input pixel."""
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        return tile
    p0 = (int(round(x * scale)), int(round(y * scale)))
    p1 = (int(round((x + w) * scale)) - 1, int(round((y + h) * scale)) - 1)
    tile = tile.copy()
    cv2.rectangle(tile, p0, p1, (0, 0, 0), 3)
    cv2.rectangle(tile, p0, p1, colour, 1)
    return tile


def wrap(tiles: Sequence[Tile], columns: int) -> List[List[Tile]]:
    """Tiles in rows of at most `columns`, as even as possible (26 tiles, 9 columns: 9, 9, 8)."""
    if not tiles:
        return []
    per_row = -(-len(tiles) // -(-len(tiles) // max(1, columns)))
    return [list(tiles[j:j + per_row]) for j in range(0, len(tiles), per_row)]
