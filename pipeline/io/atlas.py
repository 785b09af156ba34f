"""The atlas of a layer: `png/atlas/<layer>.png` drawn from a `dataset_examples` summary, one row
per channel:

    [filter image | top-k patches, each titled "<score> · <id>" | bottom-k patches | histogram]

The first tile is the channel's filter_vis image when the top_activated cache holds it (never
computed here), else a grey tile naming the channel; bottom patches appear when the summary has
them (option bottom > 0); the histogram tile draws `hist` over `hist_edges` (zoomed to the bins
that hold scores) with the `quantiles` marked, the median in red.

Sizes: tiles are `render.tile` px, at most ATLAS_TILE; a layer of more than PAGE_CHANNELS channels
is split into pages `png/atlas/<layer>-1.png`, `<layer>-2.png`, ... of PAGE_CHANNELS channels each
(so a 512-channel layer at top=16 gives 16 PNGs of 32 rows x 18 tiles, about 2350 x 4200 px).

Entry point (the end of a run, pipeline.runlevel): `render_atlas(out_dir, summary, cfg.render,
filter_cache({layer: folder}))`, where `summary` is {(layer, output): array} as
`RunReader.summary("dataset_examples")` returns it (or the technique's finalize) and `folder` is the
top_activated cache folder of that layer (`cache_root(cache_dir) / <key> / <layer>`), or None.
"""
from __future__ import annotations

import math
import re
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Deque, Dict, List, Mapping, Optional, Tuple

import cv2
import numpy as np

from pipeline.io.render import hwc, write_png
from pipeline.io.tiles import Tile, grid, label

ATLAS_DIR = "atlas"  # png/atlas/
ATLAS_TILE = 128  # px: the largest atlas tile (render.tile when smaller)
PAGE_CHANNELS = 32  # channels (rows) per atlas PNG
ENCODERS = 2  # pages encoded at once, in threads, while the next one is drawn
ID_CHARS = 24  # ids longer than this are shown as ".." + their last characters

FilterImages = Callable[[str, int], Optional[Tile]]  # (layer, channel) -> RGB [S, S, 3] or None


# -- filter images from the top_activated cache ------------------------------------------------------
def cached_filter(folder: Optional[Path], channel: int) -> Optional[Tile]:
    """The cached filter_vis image `folder/<channel>.png` as RGB uint8 [S, S, 3]; None when there
    is no folder, no such PNG, or it cannot be decoded. Never computes one."""
    if folder is None:
        return None
    path = Path(folder) / f"{int(channel)}.png"
    if not path.is_file():
        return None
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def filter_cache(folders: Mapping[str, Optional[Path]]) -> FilterImages:
    """A `filter_images(layer, channel)` reading each layer's cache folder (`cached_filter`)."""
    return lambda layer, channel: cached_filter(folders.get(layer), channel)


# -- the summary, by layer ----------------------------------------------------------------------------
def by_layer(summary: Mapping[Tuple[str, str], np.ndarray]) -> Dict[str, Dict[str, np.ndarray]]:
    """{(layer, output): array} -> {layer: {output: array}}, layers in their first order."""
    out: Dict[str, Dict[str, np.ndarray]] = {}
    for (layer, output), array in summary.items():
        out.setdefault(layer, {})[output] = np.asarray(array)
    return out


def file_stem(layer: str) -> str:
    """A layer name as a file name: letters, digits and `._-` kept, anything else `_`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", layer) or "_"


def page_names(layer: str, channels: int, per_page: int = PAGE_CHANNELS) -> List[str]:
    """The PNG names of a layer's atlas: `<layer>.png`, or `<layer>-1.png`.. for more than `per_page` channels."""
    pages = max(1, math.ceil(channels / per_page))
    stem = file_stem(layer)
    return [f"{stem}.png"] if pages == 1 else [f"{stem}-{i + 1}.png" for i in range(pages)]


def short_id(text: str, chars: int = ID_CHARS) -> str:
    """An id for a tile title: up to `chars` characters, a longer one as ".." + its end."""
    text = str(text)
    return text if len(text) <= chars else ".." + text[-(chars - 2):]


def hist_window(hist: np.ndarray, edges: np.ndarray) -> Tuple[int, int, np.ndarray]:
    """(first, last + 1) of the bins that hold counts (all bins when none does) and the edges with
    infinite ends replaced by a finite value one bin width out: what a histogram plot shows."""
    edges = np.asarray(edges, dtype=np.float64).copy()
    finite = np.flatnonzero(np.isfinite(edges))
    if len(finite) == 0:
        edges = np.arange(len(edges), dtype=np.float64)
    else:
        lo, hi = edges[finite[0]], edges[finite[-1]]
        width = (hi - lo) / max(1, finite[-1] - finite[0]) or 1.0
        for i in range(len(edges)):
            if not np.isfinite(edges[i]):
                edges[i] = lo - width * (finite[0] - i) if i < finite[0] else hi + width * (i - finite[-1])
    used = np.flatnonzero(np.asarray(hist) > 0)
    if len(used) == 0:
        return 0, len(hist), edges
    return int(used[0]), int(used[-1]) + 1, edges


# -- tiles ----------------------------------------------------------------------------------------------
def header_tile(layer: str, channel: int, image: Optional[Tile], size: int) -> Tile:
    """The row's first tile: the filter image titled "<layer>\\nch<c>", or a grey tile saying there is none."""
    title = f"{layer}\nch{channel}"
    if image is not None:
        return label(image, title, size)
    tile = np.full((size, size, 3), 235, np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.3, size / 400)
    for i, line in enumerate(("no filter", "image cached")):
        width = cv2.getTextSize(line, font, scale, 1)[0][0]
        cv2.putText(tile, line, ((size - width) // 2, size // 2 + i * int(28 * scale + 6)), font, scale,
                    (110, 110, 110), 1, cv2.LINE_AA)
    return label(tile, title, size)


def patch_tiles(scores: np.ndarray, ids: np.ndarray, patches: Optional[np.ndarray], size: int,
                prefix: str = "") -> List[Tile]:
    """Patches [k, 3, P, P] uint8 as titled tiles "<prefix><score> · <id>" (grey when patches are absent)."""
    tiles = []
    for j in range(len(scores)):
        image = hwc(patches[j]) if patches is not None else np.full((size, size, 3), 200, np.uint8)
        tiles.append(label(image, f"{prefix}{float(scores[j]):.3g} · {short_id(ids[j])}", size))
    return tiles


def histogram_tile(hist: np.ndarray, edges: np.ndarray, quantiles: Optional[np.ndarray],
                   levels: Optional[np.ndarray], size: int, title: str = "scores") -> Tile:
    """A bar plot of `hist` [B] over `edges` [B + 1] (the bins that hold counts), the quantiles as
    vertical lines (level 0.5 in red, others orange), the range's ends written below."""
    tile = np.full((size, size, 3), 255, np.uint8)
    first, last, edges = hist_window(hist, edges)
    lo, hi = float(edges[first]), float(edges[last])
    span = (hi - lo) or 1.0
    left, right, top, bottom = 4, size - 4, int(size * 0.24), size - int(size * 0.14)
    counts = np.asarray(hist[first:last], dtype=np.float64)
    peak = float(counts.max()) if counts.size and counts.max() > 0 else 1.0

    def x(value: float) -> int:
        return int(round(left + (right - left) * (value - lo) / span))

    for b, count in enumerate(counts):
        if count > 0:
            y = int(round(bottom - (bottom - top) * count / peak))
            cv2.rectangle(tile, (x(edges[first + b]), y), (max(x(edges[first + b]), x(edges[first + b + 1]) - 1), bottom),
                          (70, 110, 170), -1)
    marks = list(zip(np.asarray(quantiles if quantiles is not None else []),
                     np.asarray(levels if levels is not None else [])))
    for q, level in sorted(marks, key=lambda m: abs(float(m[1]) - 0.5) < 1e-9):  # the median on top
        if np.isfinite(q):
            colour = (215, 40, 40) if abs(float(level) - 0.5) < 1e-9 else (240, 150, 30)
            cv2.line(tile, (x(float(np.clip(q, lo, hi))), top), (x(float(np.clip(q, lo, hi))), bottom), colour, 1)
    cv2.line(tile, (left, bottom), (right, bottom), (0, 0, 0), 1)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.25, size / 480)
    high = f"{hi:.3g}"
    cv2.putText(tile, f"{lo:.3g}", (left, size - 4), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(tile, high, (right - cv2.getTextSize(high, font, scale, 1)[0][0], size - 4), font, scale,
                (0, 0, 0), 1, cv2.LINE_AA)
    return label(tile, title, size)


def channel_row(layer: str, arrays: Mapping[str, np.ndarray], i: int, size: int,
                filter_images: Optional[FilterImages]) -> List[Tile]:
    """The tiles of row `i` (the i-th channel of the layer's summary `arrays`)."""
    channel = int(arrays["channels"][i]) if "channels" in arrays else i
    image = filter_images(layer, channel) if filter_images is not None else None
    row = [header_tile(layer, channel, image, size)]
    for prefix, title in (("top", ""), ("bottom", "low ")):
        if f"{prefix}_scores" in arrays:
            patches = arrays.get(f"{prefix}_patches")
            row += patch_tiles(arrays[f"{prefix}_scores"][i], arrays[f"{prefix}_ids"][i],
                               patches[i] if patches is not None else None, size, title)
    if "hist" in arrays and "hist_edges" in arrays:
        quantiles = arrays.get("quantiles")
        levels = arrays.get("quantile_levels")
        median = ""
        if quantiles is not None and levels is not None and np.any(np.isclose(levels, 0.5)):
            median = f" · median {float(quantiles[i][int(np.argmin(np.abs(levels - 0.5)))]):.3g}"
        row.append(histogram_tile(arrays["hist"][i], arrays["hist_edges"], quantiles[i] if quantiles is not None else None,
                                  levels, size, f"ch{channel}{median}"))
    return row


# -- the PNGs --------------------------------------------------------------------------------------------
def atlas_tile(cfg) -> int:
    """The side of an atlas tile: render.tile, at most ATLAS_TILE."""
    return min(int(cfg.tile), ATLAS_TILE)


def render_atlas(out_dir, summary: Mapping[Tuple[str, str], np.ndarray], cfg,
                 filter_images: Optional[FilterImages] = None, per_page: int = PAGE_CHANNELS) -> List[Path]:
    """Write `png/atlas/<layer>.png` (or its pages `<layer>-<part>.png`) for every layer of a
    dataset_examples summary, each written atomically; a page left by an earlier drawing of the
    same layer that this one does not write is removed. Returns the paths written, layer by layer.
    Pages are encoded in ENCODERS threads (OpenCV lets go of the GIL) while the next ones are drawn."""
    folder = Path(out_dir) / "png" / ATLAS_DIR
    size, written = atlas_tile(cfg), []
    with ThreadPoolExecutor(ENCODERS, thread_name_prefix="atlas-png") as pool:
        pending: Deque[Future] = deque()
        try:
            for layer, arrays in by_layer(summary).items():
                if "top_scores" not in arrays:
                    continue
                count = len(arrays["top_scores"])
                for part, name in enumerate(page_names(layer, count, per_page)):
                    rows = [channel_row(layer, arrays, i, size, filter_images)
                            for i in range(part * per_page, min(count, (part + 1) * per_page))]
                    if not rows:  # a layer without channels: an empty page would say nothing
                        continue
                    while len(pending) >= ENCODERS:  # at most this many pages held in memory
                        pending.popleft().result()
                    pending.append(pool.submit(write_png, folder / name, grid(rows, size)))
                    written.append(folder / name)
                for future in pending:  # this layer's pages exist before its stale ones go
                    future.result()
                pending.clear()
                remove_stale_pages(folder, layer, keep=set(written))
        finally:
            for future in pending:
                future.cancel()
    return written


def remove_stale_pages(folder: Path, layer: str, keep) -> None:
    """Delete `<layer>.png` / `<layer>-<n>.png` in `folder` that are not in `keep`."""
    stem = re.escape(file_stem(layer))
    pattern = re.compile(rf"{stem}(-\d+)?\.png")
    if folder.is_dir():
        for path in folder.iterdir():
            if pattern.fullmatch(path.name) and path not in keep:
                path.unlink(missing_ok=True)


def atlas_pages(run_dir, layer: str) -> List[Path]:
    """The atlas PNGs a run wrote for a layer, in page order ([] when none)."""
    folder = Path(run_dir) / "png" / ATLAS_DIR
    single = folder / f"{file_stem(layer)}.png"
    if single.is_file():
        return [single]
    pages = []
    for part in range(1, 1 << 20):
        path = folder / f"{file_stem(layer)}-{part}.png"
        if not path.is_file():
            return pages
        pages.append(path)
    return pages
