"""The one place maps become pictures: upsampling, normalisation, colouring, tiles and grids."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from pipeline.io.space import write_atomic

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


def write_png(path, image: np.ndarray) -> None:
    """Encode an RGB image and write it atomically (temporary file, then rename; DiskFull when the
    disk is full, leaving no partial file)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode {path}")
    write_atomic(Path(path), buf.tobytes())


def technique_rows(
    technique: str,
    kinds: Dict[str, str],
    maps: Dict[Tuple[str, str], np.ndarray],
    image: Tile,
    title: str,
    targets: Sequence[Tuple[str, float]],
    cfg,
    draw: Optional[dict] = None,
) -> List[List[Tile]]:
    """Tiles for one input and one technique; `maps` holds this input's arrays (no batch axis).

    heatmap  [K, h, w]     -> per target: input | overlay | input weighted by the map
    gradient [K, C, H, W]  -> per target: input | signed colour image | grey max-abs image
    channels [C, h, w]     -> the `channels` most activated channels, each in `colormap`
    image    [3, H, W]     -> input | the image made from it (uint8), e.g. a dream or an inversion
    tiles    [n, 3, S, S]  -> input | n images about it, titled with the layer's "channels" output
    rf       [K, h, w]     -> per crop k: input | one tile per layer (`rf_rows`, with `draw`)
    A clip (image [T, S, S, 3]) is drawn by `clip_rows` instead.
    """
    rf = [(layer, m) for (layer, output), m in maps.items() if kinds.get(output) == "rf"]
    if rf and image.ndim == 3:
        return rf_rows(rf, image, title, cfg, draw or {})
    if targets:
        title = f"{title} | {targets[0][0]} {targets[0][1]:.2f}"
    if image.ndim == 4:
        return clip_rows(technique, kinds, maps, image, title, targets, cfg)
    size, colormap, alpha, channels = cfg.tile, cfg.colormap, cfg.alpha, cfg.channels
    image = fit(image, size)  # draw at tile size: nothing is composited larger than it is shown
    side = size
    first = label(image, title, size)
    rows: List[List[Tile]] = []
    for (layer, output), m in maps.items():
        kind = kinds.get(output, "data")
        if kind == "heatmap" and m.ndim == 3:
            for k, (cls, score) in enumerate(targets[: m.shape[0]]):
                m01 = normalize(upsample(m[k], side))
                text = f"{technique} {layer} | {cls} {score:.2f}"
                rows.append([first, label(overlay(image, m01, colormap, alpha), text, size),
                             label(weight(image, m01), f"{layer} weighted", size)])
        elif kind == "gradient" and m.ndim == 4:
            for k, (cls, score) in enumerate(targets[: m.shape[0]]):
                g = m[k].transpose(1, 2, 0)  # [H, W, C]
                colour = np.uint8(symmetric(g) * 255)
                text = f"{technique} {layer} | {cls} {score:.2f}" if layer != "input" else f"{technique} | {cls} {score:.2f}"
                rows.append([first, label(colour, text, size),
                             label(grey(normalize(np.abs(g).max(2), 99.0)), f"{technique} grey", size)])
        elif kind == "tiles" and m.ndim == 4:  # [n, 3, S, S] uint8 images about this input's channels
            ids, means = maps.get((layer, "channels")), maps.get((layer, "mean"))
            rows.append([first] + [
                label(np.ascontiguousarray(m[j].transpose(1, 2, 0)),
                      f"{layer} ch{int(ids[j])}" + (f" {float(means[j]):.2f}" if means is not None else "")
                      if ids is not None else f"{layer} {j}", size)
                for j in range(m.shape[0])])
        elif kind == "image" and m.ndim == 3:  # [3, H, W] uint8 made from this input
            rows.append([first, label(np.ascontiguousarray(m.transpose(1, 2, 0)), f"{technique} {layer}", size)])
        elif kind == "channels" and m.ndim == 3:
            means = m.reshape(m.shape[0], -1).mean(1)
            top = np.argsort(-means, kind="stable")[:channels]
            row = [first]
            for c in top:
                tile = colorize(normalize(upsample(m[c], side)), "viridis")
                row.append(label(tile, f"{layer} ch{c} {means[c]:.2f}", size))
            rows.append(row)
    return rows


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


def rf_rows(maps: Sequence[Tuple[str, np.ndarray]], image: Tile, title: str, cfg, draw: dict) -> List[List[Tile]]:
    """Receptive-field maps [K, h, w] of several layers: per crop k, the input (with box k when
    draw["boxes"] is a list) then one tile per layer, labelled "<layer> <draw["labels"][layer]>",
    wrapped into a grid of even rows (`rf_columns`: at most `gallery_columns` tiles and
    RF_MAX_WIDTH px a row). draw["display"]: heatmap (the map over the input) or weighted (the
    input weighted by the map); draw["scale"]: fraction (fixed [0, 1], so layers
    compare) or max (each map by its maximum); a dict draw["boxes"] puts each layer's box on its tile."""
    size = cfg.tile
    scale = size / image.shape[1]
    image = fit(image, size)
    labels, boxes = draw.get("labels", {}), draw.get("boxes")
    rows: List[List[Tile]] = []
    for k in range(maps[0][1].shape[0]):
        first = label(image, title, size)
        if isinstance(boxes, list) and k < len(boxes):
            first = rectangle(first, boxes[k], scale)
        tiles = [first]
        for layer, m in maps:
            up = upsample(m[k], size)
            m01 = np.clip(up, 0, 1) if draw.get("scale") == "fraction" else normalize(up)
            tile = weight(image, m01) if draw.get("display") == "weighted" else overlay(image, m01, cfg.colormap, cfg.alpha)
            if isinstance(boxes, dict) and layer in boxes:
                tile = rectangle(tile, boxes[layer], scale)
            tiles.append(label(tile, f"{layer} {labels.get(layer, '')}".strip(), size))
        rows.extend(wrap(tiles, rf_columns(cfg)))
    return rows


RF_MAX_WIDTH = 1600  # px: a receptive-field grid is at most this wide (or 2 tiles), however many layers


def rf_columns(cfg, pad: int = 2) -> int:
    """Tiles per row of a receptive-field grid: `gallery_columns`, at most RF_MAX_WIDTH px, at least 2."""
    return max(2, min(cfg.gallery_columns, (RF_MAX_WIDTH - pad) // (cfg.tile + pad)))


def wrap(tiles: Sequence[Tile], columns: int) -> List[List[Tile]]:
    """Tiles in rows of at most `columns`, as even as possible (26 tiles, 9 columns: 9, 9, 8)."""
    if not tiles:
        return []
    per_row = -(-len(tiles) // -(-len(tiles) // max(1, columns)))
    return [list(tiles[j:j + per_row]) for j in range(0, len(tiles), per_row)]


def render_summary(out_dir, technique: str, arrays: Dict[Tuple[str, str], np.ndarray], draw: dict, cfg) -> Optional[object]:
    """png/<technique>.png for a run-level summary: per layer its "mean" map [H, W] (scaled by its
    maximum) with its "rf_box" [x, y, w, h], labelled with draw["labels"] and the "sigma" [x, y]."""
    size = cfg.tile
    labels = draw.get("labels", {})
    tiles = []
    for layer in dict.fromkeys(layer for layer, _ in arrays):
        mean = arrays.get((layer, "mean"))
        if mean is None:
            continue
        tile = colorize(normalize(upsample(mean, size)), cfg.colormap)
        box = arrays.get((layer, "rf_box"))
        if box is not None:
            tile = rectangle(tile, box, size / mean.shape[1])
        sigma = arrays.get((layer, "sigma"))
        text = f"{layer} {labels.get(layer, '')}" + (f" sd {float(np.mean(sigma)):.1f}px" if sigma is not None else "")
        tiles.append(label(tile, text, size))
    if not tiles:
        return None
    per_row = max(1, cfg.gallery_columns)
    path = out_dir / "png" / f"{technique}.png"
    write_png(path, grid([tiles[j:j + per_row] for j in range(0, len(tiles), per_row)], size))
    return path


def clip_rows(technique, kinds, maps, clip: np.ndarray, title: str, targets, cfg) -> List[List[Tile]]:
    """A clip's frames over time (up to `cfg.frames`, evenly spaced), the maps overlaid per frame.

    heatmap [K, T, H, W] and gradient [K, C, T, H, W]: one row per layer and target, scaled over
    the whole clip so that the rows show how the map moves in time; channels [C, T, h, w]: the top
    channels averaged over time, beside the middle frame.
    """
    size, T = cfg.tile, clip.shape[0]
    clip = np.stack([fit(frame, size) for frame in clip])
    side = size
    picks = np.unique(np.linspace(0, T - 1, min(cfg.frames, T)).round().astype(int))
    first = label(clip[picks[0]], title, size)
    rows: List[List[Tile]] = []
    for (layer, output), m in maps.items():
        kind = kinds.get(output, "data")
        if kind == "heatmap" and m.ndim == 4:
            for k, (cls, score) in enumerate(targets[: m.shape[0]]):
                m01 = normalize(np.stack([upsample(m[k, t], side) for t in range(m.shape[1])]))
                rows.append([first] + [
                    label(overlay(clip[t], m01[min(t, len(m01) - 1)], cfg.colormap, cfg.alpha),
                          f"{layer} t={t} | {cls} {score:.2f}", size) for t in picks])
        elif kind == "gradient" and m.ndim == 5:
            for k, (cls, score) in enumerate(targets[: m.shape[0]]):
                g = symmetric(m[k].transpose(1, 2, 3, 0))  # [T, H, W, C] in [0, 1]
                rows.append([first] + [label(np.uint8(g[t] * 255), f"{technique} t={t} | {cls}", size)
                                       for t in picks])
        elif kind == "channels" and m.ndim == 4:
            mean_map = m.mean(1)  # [C, h, w]
            means = mean_map.reshape(mean_map.shape[0], -1).mean(1)
            top = np.argsort(-means, kind="stable")[: cfg.channels]
            rows.append([label(clip[T // 2], title, size)] + [
                label(colorize(normalize(upsample(mean_map[c], side)), "viridis"), f"{layer} ch{c} {means[c]:.2f}", size)
                for c in top])
    return rows


def png_name(item_id: str) -> str:
    """The PNG file name of an input, the same in every `png/<technique>/` folder (maps.h5 records
    it per row in the `png` dataset). An id made of ASCII letters, digits and `._-@` only, up to
    150 characters, keeps its name ("chelsea.jpg" -> "chelsea.jpg.png"); any other id is cleaned
    ("/" -> "__", other characters -> "_", cut to 150 characters) and gets "~" and 12 hex digits of
    the SHA-1 of the exact id ("a b.jpg" -> "a_b.jpg~<sha1>.png"). Cleaned names never equal a kept
    name (they hold "~", which is never kept), so two inputs never share a PNG."""
    clean = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "._-@" else "_"
                    for ch in item_id.replace("/", "__"))
    if clean == item_id and 0 < len(item_id) <= 150 and not item_id.startswith("."):
        return f"{item_id}.png"
    return f"{clean[:150]}~{hashlib.sha1(item_id.encode()).hexdigest()[:12]}.png"


def png_path(out_dir, technique: str, item_id: str) -> Path:
    """Where `render_input` writes an input's grid for a technique: png/<technique>/<png_name>."""
    return Path(out_dir) / "png" / technique / png_name(item_id)


def render_input(
    out_dir, item_id: str, technique: str, kinds: Dict[str, str], maps, image: Tile,
    targets: Sequence[Tuple[str, float]], cfg, label_fn: Optional[Callable[[str], str]] = None,
    draw: Optional[dict] = None,
):
    """Write png/<technique>/<png_name(id)> for one input (atomically); returns the path, or None
    if nothing to draw."""
    rows = technique_rows(technique, kinds, maps, image, label_fn(item_id) if label_fn else item_id,
                          targets, cfg, draw)
    if not rows:
        return None
    path = png_path(out_dir, technique, item_id)
    write_png(path, grid(rows, cfg.tile))
    return path


def render_gallery(out_dir, technique: str, results: Dict[Tuple[str, str], np.ndarray], cfg) -> Optional[object]:
    """png/<technique>.png: one row per layer of its synthesized images [M, 3, H, W] uint8 (wrapped
    every `gallery_columns` tiles), each tile titled with the layer's "label" output when it has
    one (e.g. "blocks.4 · ch 5", "Egyptian cat (285)"), else "<layer> <index>" (channel or class),
    followed by the final "objective" value when there is one."""
    rows: List[List[Tile]] = []
    for layer in dict.fromkeys(layer for layer, _ in results):
        images = results.get((layer, "images"))
        if images is None:
            continue
        index = results.get((layer, "index"), np.arange(len(images)))
        objective = results.get((layer, "objective"))
        titles = results.get((layer, "label"))
        row = []
        for i, img in enumerate(images):
            if titles is not None:
                text = str(titles[i]) + (f" · {float(objective[i, -1]):.1f}" if objective is not None else "")
            else:
                text = f"{layer} {int(index[i])}" + (f" {float(objective[i, -1]):.2f}" if objective is not None else "")
            row.append(label(fit(np.ascontiguousarray(img.transpose(1, 2, 0)), cfg.tile), text, cfg.tile))
        per_row = max(1, cfg.gallery_columns)
        rows.extend(row[j:j + per_row] for j in range(0, len(row), per_row))
    if not rows:
        return None
    path = out_dir / "png" / f"{technique}.png"
    write_png(path, grid(rows, cfg.tile))
    return path
