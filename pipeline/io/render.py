"""The one place maps become pictures: each input's grid per technique, the galleries of data-free
techniques, run-level summaries, and the PNGs' names.

How an output is drawn follows its declared Kind (pipeline.contracts): one drawer per kind turns
one (layer, output) of one input into rows of tiles (the primitives are in pipeline.io.tiles)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from pipeline.contracts import Display, Draw, Kind, Scale
from pipeline.io.space import write_atomic
from pipeline.io.tiles import (Tile, colorize, fit, grey, grid, label, normalize, overlay, rectangle, symmetric,
                               upsample, weight, wrap)

Targets = Sequence[Tuple[str, float]]  # (class name, score) of each target
Rows = List[List[Tile]]


def write_png(path, image: np.ndarray) -> None:
    """Encode an RGB image and write it atomically (temporary file, then rename; DiskFull when the
    disk is full, leaving no partial file)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode {path}")
    write_atomic(Path(path), buf.tobytes())


def hwc(image: np.ndarray) -> Tile:
    """[3, H, W] uint8 -> [H, W, 3], contiguous (what OpenCV draws on)."""
    return np.ascontiguousarray(image.transpose(1, 2, 0))


@dataclass(frozen=True)
class Frame:
    """What the rows of one input's grid share: the technique, the input at tile size (an image
    [S, S, 3], or a clip's frames [T, S, S, 3] of which `picks` are drawn), its titled tile, the
    title, the targets (class name, score) and the render config."""

    technique: str
    image: np.ndarray
    first: Tile
    title: str
    targets: Targets
    cfg: object
    picks: Optional[np.ndarray] = None


def technique_rows(technique: str, kinds: Mapping[str, Kind], maps: Dict[Tuple[str, str], np.ndarray], image: Tile,
                   title: str, targets: Targets, cfg, draw: Optional[Draw] = None) -> Rows:
    """Tiles for one input and one technique; `maps` holds this input's arrays (no batch axis),
    `kinds` each output's Kind: receptive-field maps go to `rf_rows` (as `draw` says), a clip
    (image [T, S, S, 3]) to `clip_rows`, an image to `image_rows`."""
    kinds = {output: Kind(kind) for output, kind in kinds.items()}
    rf = [(layer, m) for (layer, output), m in maps.items() if kinds.get(output) is Kind.RF]
    if rf and image.ndim == 3:
        return rf_rows(rf, image, title, cfg, draw or Draw())
    if targets:
        title = f"{title} | {targets[0][0]} {targets[0][1]:.2f}"
    compose = clip_rows if image.ndim == 4 else image_rows
    return compose(technique, kinds, maps, image, title, targets, cfg)


def image_rows(technique, kinds, maps, image: Tile, title: str, targets: Targets, cfg) -> Rows:
    """An image's rows, each output drawn by IMAGE_DRAWERS[its kind]:
    heatmap  [K, h, w]     -> per target: input | overlay | input weighted by the map
    gradient [K, C, H, W]  -> per target: input | signed colour image | grey max-abs image
    channels [C, h, w]     -> the `channels` most activated channels, each in viridis
    image    [3, H, W]     -> input | the image made from it (uint8), e.g. a dream or an inversion
    tiles    [n, 3, S, S]  -> input | n images about it, titled with the layer's "channels" output
    """
    image = fit(image, cfg.tile)  # draw at tile size: nothing is composited larger than it is shown
    return draw_outputs(IMAGE_DRAWERS, Frame(technique, image, label(image, title, cfg.tile), title, targets, cfg),
                        kinds, maps)


def clip_rows(technique, kinds, maps, clip: np.ndarray, title: str, targets: Targets, cfg) -> Rows:
    """A clip's frames over time (up to `cfg.frames`, evenly spaced), the maps overlaid per frame,
    each output drawn by CLIP_DRAWERS[its kind]:
    heatmap [K, T, H, W] and gradient [K, C, T, H, W]: one row per layer and target, scaled over
    the whole clip so that the rows show how the map moves in time; channels [C, T, h, w]: the top
    channels averaged over time, beside the middle frame.
    """
    size, T = cfg.tile, clip.shape[0]
    clip = np.stack([fit(frame, size) for frame in clip])
    picks = np.unique(np.linspace(0, T - 1, min(cfg.frames, T)).round().astype(int))
    frame = Frame(technique, clip, label(clip[picks[0]], title, size), title, targets, cfg, picks)
    return draw_outputs(CLIP_DRAWERS, frame, kinds, maps)


def draw_outputs(drawers, frame: Frame, kinds: Mapping[str, Kind], maps) -> Rows:
    """The rows of every (layer, output) whose kind has a drawer for maps of its rank, in order."""
    rows: Rows = []
    for (layer, output), m in maps.items():
        rank, draw = drawers.get(kinds.get(output, Kind.DATA), (None, None))
        if draw is not None and m.ndim == rank:
            rows.extend(draw(frame, layer, m, maps))
    return rows


def heatmap_rows(f: Frame, layer: str, m: np.ndarray, maps) -> Rows:
    """m [K, h, w] -> per target: input | the map over it | the input weighted by the map."""
    size, rows = f.cfg.tile, []
    for k, (cls, score) in enumerate(f.targets[: m.shape[0]]):
        m01 = normalize(upsample(m[k], size))
        rows.append([f.first, label(overlay(f.image, m01, f.cfg.colormap, f.cfg.alpha),
                                    f"{f.technique} {layer} | {cls} {score:.2f}", size),
                     label(weight(f.image, m01), f"{layer} weighted", size)])
    return rows


def gradient_rows(f: Frame, layer: str, m: np.ndarray, maps) -> Rows:
    """m [K, C, H, W] -> per target: input | signed colour image | grey max-abs image."""
    size, rows = f.cfg.tile, []
    where = f.technique if layer == "input" else f"{f.technique} {layer}"
    for k, (cls, score) in enumerate(f.targets[: m.shape[0]]):
        g = m[k].transpose(1, 2, 0)  # [H, W, C]
        rows.append([f.first, label(np.uint8(symmetric(g) * 255), f"{where} | {cls} {score:.2f}", size),
                     label(grey(normalize(np.abs(g).max(2), 99.0)), f"{f.technique} grey", size)])
    return rows


def tiles_rows(f: Frame, layer: str, m: np.ndarray, maps) -> Rows:
    """m [n, 3, S, S] uint8 images about this input -> one row, each titled with the layer's
    "channels" output (and its "mean") when it has one, else with its position."""
    ids, means = maps.get((layer, "channels")), maps.get((layer, "mean"))

    def title(j: int) -> str:
        if ids is None:
            return f"{layer} {j}"
        return f"{layer} ch{int(ids[j])}" + (f" {float(means[j]):.2f}" if means is not None else "")

    return [[f.first] + [label(hwc(m[j]), title(j), f.cfg.tile) for j in range(m.shape[0])]]


def image_output_rows(f: Frame, layer: str, m: np.ndarray, maps) -> Rows:
    """m [3, H, W] uint8 made from this input -> input | the image."""
    return [[f.first, label(hwc(m), f"{f.technique} {layer}", f.cfg.tile)]]


def channels_rows(f: Frame, layer: str, m: np.ndarray, maps) -> Rows:
    """m [C, h, w] -> one row: input | the `render.channels` channels of highest mean, in viridis."""
    means = m.reshape(m.shape[0], -1).mean(1)
    top = np.argsort(-means, kind="stable")[: f.cfg.channels]
    return [[f.first] + [label(colorize(normalize(upsample(m[c], f.cfg.tile)), "viridis"),
                               f"{layer} ch{c} {means[c]:.2f}", f.cfg.tile) for c in top]]


def clip_heatmap_rows(f: Frame, layer: str, m: np.ndarray, maps) -> Rows:
    """m [K, T, h, w] -> per target: the picked frames with the map over each, one scale for the clip."""
    size, rows = f.cfg.tile, []
    for k, (cls, score) in enumerate(f.targets[: m.shape[0]]):
        m01 = normalize(np.stack([upsample(m[k, t], size) for t in range(m.shape[1])]))
        rows.append([f.first] + [
            label(overlay(f.image[t], m01[min(t, len(m01) - 1)], f.cfg.colormap, f.cfg.alpha),
                  f"{layer} t={t} | {cls} {score:.2f}", size) for t in f.picks])
    return rows


def clip_gradient_rows(f: Frame, layer: str, m: np.ndarray, maps) -> Rows:
    """m [K, C, T, H, W] -> per target: the picked frames' signed colour images."""
    rows = []
    for k, (cls, _) in enumerate(f.targets[: m.shape[0]]):
        g = symmetric(m[k].transpose(1, 2, 3, 0))  # [T, H, W, C] in [0, 1]
        rows.append([f.first] + [label(np.uint8(g[t] * 255), f"{f.technique} t={t} | {cls}", f.cfg.tile)
                                 for t in f.picks])
    return rows


def clip_channels_rows(f: Frame, layer: str, m: np.ndarray, maps) -> Rows:
    """m [C, T, h, w] -> the top channels averaged over time, beside the clip's middle frame."""
    middle = label(f.image[len(f.image) // 2], f.title, f.cfg.tile)
    return channels_rows(replace(f, first=middle), layer, m.mean(1), maps)


Drawer = Tuple[int, Callable[[Frame, str, np.ndarray, Mapping], Rows]]  # (rank of one input's map, rows)
IMAGE_DRAWERS: Dict[Kind, Drawer] = {
    Kind.HEATMAP: (3, heatmap_rows), Kind.GRADIENT: (4, gradient_rows), Kind.CHANNELS: (3, channels_rows),
    Kind.IMAGE: (3, image_output_rows), Kind.TILES: (4, tiles_rows),
}
CLIP_DRAWERS: Dict[Kind, Drawer] = {
    Kind.HEATMAP: (4, clip_heatmap_rows), Kind.GRADIENT: (5, clip_gradient_rows), Kind.CHANNELS: (4, clip_channels_rows),
}


def rf_rows(maps: Sequence[Tuple[str, np.ndarray]], image: Tile, title: str, cfg, draw: Draw) -> Rows:
    """Receptive-field maps [K, h, w] of several layers: per crop k, the input (with
    draw.crop_boxes[k] when there is one) then one `rf_tile` per layer, wrapped into a grid of even
    rows (`rf_columns`: at most `gallery_columns` tiles and RF_MAX_WIDTH px a row)."""
    size = cfg.tile
    scale = size / image.shape[1]
    image = fit(image, size)
    rows: Rows = []
    for k in range(maps[0][1].shape[0]):
        first = label(image, title, size)
        if k < len(draw.crop_boxes):
            first = rectangle(first, draw.crop_boxes[k], scale)
        tiles = [first] + [rf_tile(image, layer, m[k], scale, cfg, draw) for layer, m in maps]
        rows.extend(wrap(tiles, rf_columns(cfg)))
    return rows


def rf_tile(image: Tile, layer: str, m: np.ndarray, scale: float, cfg, draw: Draw) -> Tile:
    """One layer's map [h, w] for one crop on the input tile: scaled by draw.scale (fraction: fixed
    [0, 1], so layers compare; max: by its maximum), drawn as draw.display says (the map over the
    input, or the input weighted by it), with draw.layer_boxes[layer] and labelled "<layer>
    <draw.labels[layer]>"; `scale` is tile pixels per input pixel."""
    size = cfg.tile
    up = upsample(m, size)
    m01 = np.clip(up, 0, 1) if draw.scale is Scale.FRACTION else normalize(up)
    tile = weight(image, m01) if draw.display is Display.WEIGHTED else overlay(image, m01, cfg.colormap, cfg.alpha)
    if layer in draw.layer_boxes:
        tile = rectangle(tile, draw.layer_boxes[layer], scale)
    return label(tile, f"{layer} {draw.labels.get(layer, '')}".strip(), size)


RF_MAX_WIDTH = 1600  # px: a receptive-field grid is at most this wide (or 2 tiles), however many layers


def rf_columns(cfg, pad: int = 2) -> int:
    """Tiles per row of a receptive-field grid: `gallery_columns`, at most RF_MAX_WIDTH px, at least 2."""
    return max(2, min(cfg.gallery_columns, (RF_MAX_WIDTH - pad) // (cfg.tile + pad)))


def render_summary(out_dir, technique: str, arrays: Dict[Tuple[str, str], np.ndarray], draw: Draw, cfg) -> Optional[object]:
    """png/<technique>.png for a run-level summary: per layer its "mean" map [H, W] (scaled by its
    maximum) with its "rf_box" [x, y, w, h], labelled with draw.labels and the "sigma" [x, y];
    nothing when draw.summary_map is False."""
    if not draw.summary_map:
        return None
    size = cfg.tile
    labels = draw.labels
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


def draw_summary(out_dir, technique: str, arrays: Dict[Tuple[str, str], np.ndarray], draw: Draw,
                 kinds: Sequence[Kind], cfg, filter_images=None) -> List[Path]:
    """The PNGs of a run-level summary, by the kinds of its declared outputs: Kind.EXAMPLES as the
    atlas (pipeline.io.atlas, with cached filter images from `filter_images(layer, channel)`), else
    the mean-map summary (render_summary). Returns the paths written."""
    if Kind.EXAMPLES in kinds:
        from pipeline.io.atlas import render_atlas

        return render_atlas(out_dir, arrays, cfg, filter_images)
    path = render_summary(out_dir, technique, arrays, draw, cfg)
    return [path] if path else []


def draw_boxes(display: np.ndarray, boxes: np.ndarray, labels: np.ndarray, class_name: Callable[[int], str]) -> np.ndarray:
    """A copy of the batch's images [N, S, S, 3] uint8 with each input's boxes [N, K, 4] (x0, y0,
    x1, y1 in their pixels) drawn and titled "<k>: <class>"; label -1 (no box) is not drawn."""
    out = display.copy()
    for n in range(out.shape[0]):
        image = np.ascontiguousarray(out[n])
        for k, (box, lab) in enumerate(zip(boxes[n], labels[n])):
            if lab < 0:
                continue
            x0, y0, x1, y1 = (int(round(float(v))) for v in box)
            colour = (255, 255, 0) if k == 0 else (0, 255, 255)
            cv2.rectangle(image, (x0, y0), (x1, y1), colour, 1)
            cv2.putText(image, f"{k}: {class_name(int(lab))}", (x0 + 1, max(8, y0 + 8)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.3, colour, 1, cv2.LINE_AA)
        out[n] = image
    return out


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
    out_dir, item_id: str, technique: str, kinds: Mapping[str, Kind], maps, image: Tile,
    targets: Targets, cfg, label_fn: Optional[Callable[[str], str]] = None, draw: Optional[Draw] = None,
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
            row.append(label(fit(hwc(img), cfg.tile), text, cfg.tile))
        per_row = max(1, cfg.gallery_columns)
        rows.extend(row[j:j + per_row] for j in range(0, len(row), per_row))
    if not rows:
        return None
    path = out_dir / "png" / f"{technique}.png"
    write_png(path, grid(rows, cfg.tile))
    return path
