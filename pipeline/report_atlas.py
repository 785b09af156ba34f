"""The report's atlas section: for a run with `summary/dataset_examples` (and/or
`summary/channel_relevance`), per layer one block per channel with its top (and bottom) patches,
their scores and ids and a histogram of its scores; per class its top channels by mean Grad-CAM
contribution, each linking to that channel's block; a box to jump to a channel or a class.

Patches are not embedded: `write_strips` writes one PNG per channel (its patches side by side)
into a folder beside the page, `<page stem>-atlas/<run>/<layer>/ch<c>.png`, and each patch is an
`<img loading="lazy">` showing its part of that strip; channel and class blocks are closed
`<details>`, so a page with thousands of patches opens at once and loads only what is shown. A
class's table is drawn by the page script when the class is opened (from its `data-top` and the
layers' `data-layers`), so a thousand classes add little to the page.
"""
from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from pipeline.io.atlas import atlas_pages, by_layer, file_stem, hist_window
from pipeline.io.render import hwc, write_png
from pipeline.io.tiles import fit
from pipeline.report_html import esc, fmt, src
from pipeline.report_atlas_page import ATLAS_CSS, ATLAS_SCRIPT, THUMB, find_form
from pipeline.store.layout import FACTS, STATS

EXAMPLES, RELEVANCE = "dataset_examples", "channel_relevance"
PATCH_MIN, PATCH_MAX = 64, 128  # px: patches are shown at their size P, clipped to this range
THUMBS = 3  # a class's channel shows its first THUMBS patches (at THUMB px)
MARKER = ".pipeline-report-atlas"  # in the strips folder: the report may replace it
BLOCK_CHANNELS = 64  # channels of patches read from maps.h5 at a time
CLASSES_OPEN = 100  # the class list starts open up to this many classes


@dataclass
class LayerAtlas:
    layer: str
    arrays: Dict[str, np.ndarray]  # the layer's dataset_examples arrays, patches left out
    patches: Tuple[str, ...]  # the patch outputs it has: ("top_patches", "bottom_patches")
    pages: List[Path]  # png/atlas pages the run drew
    size: int = PATCH_MIN  # px a patch is shown at
    strips: Dict[int, Path] = field(default_factory=dict)  # row -> its strip PNG (write_strips)

    @property
    def channels(self) -> np.ndarray:
        return np.asarray(self.arrays.get("channels", np.arange(len(self.arrays["top_scores"]))))


@dataclass
class Atlas:
    run_dir: Path
    layers: List[LayerAtlas]
    relevance: Dict[str, Dict[str, np.ndarray]]  # layer -> count, top_channels, top_values
    classes: Optional[List[str]]

    def class_name(self, i: int) -> str:
        return str(self.classes[i]) if self.classes and 0 <= i < len(self.classes) else f"class {i}"


def read_atlas(reader, run_dir: Path) -> Optional[Atlas]:
    """The atlas of an open run (a RunReader), everything but the patches; None without either summary."""
    found = reader.summaries()
    if EXAMPLES not in found and RELEVANCE not in found:
        return None
    layers = []
    if EXAMPLES in found:
        arrays: Dict[Tuple[str, str], np.ndarray] = {}
        patches: Dict[str, List[str]] = defaultdict(list)
        for name, col in reader.summary_columns(EXAMPLES).items():
            layer, _, output = name.rpartition("/")
            if name.startswith((f"{STATS}/", f"{FACTS}/")):
                continue
            if output.endswith("_patches"):
                patches[layer].append(output)
                arrays[layer, output + ".size"] = np.asarray(col.shape[-1])
            else:
                arrays[layer, output] = col.read()
        for layer, a in by_layer(arrays).items():
            if "top_scores" in a:
                size = int(np.clip(a.get("top_patches.size", PATCH_MIN), PATCH_MIN, PATCH_MAX))
                kept = tuple(o for o in ("top_patches", "bottom_patches") if o in patches[layer])
                layers.append(LayerAtlas(layer, a, kept, atlas_pages(run_dir, layer), size))
    relevance = {}
    if RELEVANCE in found:
        for name, col in reader.summary_columns(RELEVANCE).items():
            layer, _, output = name.rpartition("/")
            if output in ("count", "top_channels", "top_values") and not name.startswith((f"{STATS}/", f"{FACTS}/")):
                relevance.setdefault(layer, {})[output] = col.read()
    return Atlas(Path(run_dir), layers, relevance, reader.classes())


# -- the strips beside the page ---------------------------------------------------------------------
def strips_folder(out: Path) -> Path:
    """Where a page's patch strips go: `<page stem>-atlas/` beside it."""
    return out.with_name(out.stem + "-atlas")


def clear_strips(folder: Path, refuse: bool) -> None:
    """Remove the strips an earlier report wrote (a folder holding MARKER); another folder of that
    name is left alone, or refused (ReportError) when `refuse`."""
    from pipeline.report import ReportError

    if (folder / MARKER).is_file():
        shutil.rmtree(folder)
    elif folder.exists() and refuse:
        raise ReportError(f"{folder} exists and is not a report's atlas folder (no {MARKER}); move it away")


def write_strips(atlas: Atlas, folder: Path) -> None:
    """One PNG per channel, `folder/<layer>/ch<c>.png`: its top then bottom patches side by side
    at the layer's display size, read from maps.h5 a block of channels at a time."""
    from pipeline.store import open_run

    used: set = set()
    with open_run(atlas.run_dir) as reader:
        cols = reader.summary_columns(EXAMPLES)
        for la in atlas.layers:
            if not la.patches:
                continue
            name, i = file_stem(la.layer), 2
            while name in used:
                name, i = f"{file_stem(la.layer)}~{i}", i + 1
            used.add(name)
            parts = [cols[f"{la.layer}/{output}"] for output in la.patches]
            for start in range(0, len(la.channels), BLOCK_CHANNELS):
                blocks = [col[start:start + BLOCK_CHANNELS] for col in parts]
                for row in range(len(blocks[0])):
                    tiles = [fit(hwc(p), la.size) for block in blocks for p in block[row]]
                    if tiles:
                        path = folder / name / f"ch{int(la.channels[start + row])}.png"
                        write_png(path, np.concatenate(tiles, axis=1))
                        la.strips[start + row] = path


def write_atlas_strips(runs: Sequence, out: Path) -> Dict[str, str]:
    """The patch strips of the runs' (pipeline.report.Run) atlases beside the page `out`,
    replacing an earlier report's; page() keywords adding the atlas CSS and script when a run has one."""
    folder = strips_folder(out)
    atlases = [r for r in runs if r.atlas is not None]
    clear_strips(folder, refuse=bool(atlases))
    if not atlases:
        return {}
    folder.mkdir(parents=True)
    (folder / MARKER).touch()
    for r in atlases:
        write_strips(r.atlas, folder / r.anchor)
    return {"css": ATLAS_CSS, "script": ATLAS_SCRIPT}


# -- HTML ----------------------------------------------------------------------------------------------
def ids(prefix: str, layer: Optional[str] = None, channel: Optional[int] = None, cls: Optional[int] = None) -> str:
    """Anchor ids: `<prefix>atlas-<layer>-ch<c>`, `<prefix>atlas-<layer>`, `<prefix>atlas-class-<i>`."""
    if cls is not None:
        return f"{prefix}atlas-class-{cls}"
    anchor = f"{prefix}atlas-{file_stem(layer)}"
    return anchor if channel is None else f"{anchor}-ch{channel}"


def patch_img(path: Path, base: Path, offset: int, alt: str) -> str:
    """An <img loading="lazy"> showing the patch at `offset` px of a strip (its size: the CSS of .atlas-patches)."""
    return f'<img loading="lazy" src="{esc(src(path, base))}" alt="{esc(alt)}" style="object-position:-{offset}px 0">'


def hist_svg(hist: np.ndarray, edges: np.ndarray, quantiles, levels, width: int = 200, height: int = 56) -> str:
    """The histogram as an inline SVG: bars over the bins that hold scores, quantiles as lines (median red)."""
    first, last, edges = hist_window(hist, edges)
    lo, span = float(edges[first]), float(edges[last] - edges[first]) or 1.0
    counts = np.asarray(hist[first:last], dtype=np.float64)
    peak = float(counts.max()) if counts.size and counts.max() > 0 else 1.0

    def x(v: float) -> float:
        return width * (float(v) - lo) / span

    bars = "".join(f"M{x(edges[first + b]):.1f} {height}V{height - height * c / peak:.1f}H{x(edges[first + b + 1]):.1f}"
                   f"V{height}Z" for b, c in enumerate(counts) if c > 0)
    lines = "".join(f'<line class="{"q50" if abs(float(level) - 0.5) < 1e-9 else "q"}" x1="{x(q):.1f}" '
                    f'x2="{x(q):.1f}" y1="0" y2="{height}"/>'
                    for q, level in zip(np.clip(quantiles, lo, lo + span), levels) if np.isfinite(q))
    return (f'<svg class="atlas-hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="histogram of the scores from {fmt(lo)} to {fmt(lo + span)}"><path d="{bars}"/>{lines}</svg>')


def examples_html(la: LayerAtlas, row: int, base: Path, kind: str) -> str:
    """The `kind` (top / bottom) patches of one channel as figures: patch, score, id."""
    a = la.arrays
    scores, names = a.get(f"{kind}_scores"), a.get(f"{kind}_ids")
    if scores is None:
        return ""
    offset = len(a["top_scores"][row]) if kind == "bottom" else 0
    argmax = a.get(f"{kind}_argmax")
    out = []
    for j in range(len(scores[row])):
        name, score = str(names[row][j]), float(scores[row][j])
        where = f" · unit (y {argmax[row][j][0]}, x {argmax[row][j][1]})" if argmax is not None else ""
        image = patch_img(la.strips[row], base, (offset + j) * la.size, name) if row in la.strips else ""
        out.append(f'<figure class="{kind}" title="{esc(name)}{esc(where)}">'
                   f"{image}<figcaption>{esc(fmt(score))}<br>{esc(name)}</figcaption></figure>")
    return f'<div class="atlas-patches" style="--d:{la.size}px">{"".join(out)}</div>'



def channel_html(la: LayerAtlas, row: int, base: Path, prefix: str, drives: List[Tuple[float, int, str]]) -> str:
    """One channel's closed <details>: summary line, patches, histogram and quantiles, the classes it drives."""
    a, c = la.arrays, int(la.channels[row])
    levels, quantiles = a.get("quantile_levels"), a.get("quantiles")
    median = ""
    if levels is not None and quantiles is not None and np.any(np.isclose(levels, 0.5)):
        median = f" · median {fmt(float(quantiles[row][int(np.argmin(np.abs(levels - 0.5)))]))}"
    top = a["top_scores"][row]
    line = f"ch {c}" + (f" · top {fmt(float(top[0]))}" if len(top) else " · no examples") + median
    parts = [examples_html(la, row, base, "top")]
    if "bottom_scores" in a:
        parts.append(f'<p class="muted">Lowest scores:</p>{examples_html(la, row, base, "bottom")}')
    if "hist" in a and "hist_edges" in a:
        q = ""
        if levels is not None and quantiles is not None:
            q = " · ".join(f"{fmt(100 * float(v))}%: {fmt(float(x))}" for v, x in zip(levels, quantiles[row]))
        first, last, edges = hist_window(a["hist"][row], a["hist_edges"])
        svg = hist_svg(a["hist"][row], a["hist_edges"], quantiles[row] if quantiles is not None else [],
                       levels if levels is not None else [])
        parts.append(f'<figure class="atlas-histogram">{svg}<figcaption>scores of {esc(fmt(a.get("count")))} inputs, '
                     f"{fmt(float(edges[first]))} to {fmt(float(edges[last]))}{' · ' + q if q else ''}</figcaption></figure>")
    if drives:
        links = ", ".join(f'<a href="#{ids(prefix, cls=i)}">{esc(name)}</a> ({esc(fmt(v))})' for v, i, name in drives[:8])
        parts.append(f"<p>Among the top channels of: {links}{' ...' if len(drives) > 8 else ''}</p>")
    label = f"{la.layer} ch {c}"
    return (f'<details class="atlas-ch" id="{esc(ids(prefix, la.layer, c))}" data-layer="{esc(la.layer)}" '
            f'data-channel="{c}" data-label="{esc(label)}"><summary>{esc(line)}</summary>{"".join(parts)}</details>')


def layer_html(la: LayerAtlas, atlas: Atlas, base: Path, prefix: str) -> str:
    """A layer's open <details>: what it holds, the run's atlas PNGs, one block per channel."""
    a = la.arrays
    k = a["top_scores"].shape[1] if a["top_scores"].ndim == 2 else 0
    drives = channel_drives(atlas, la.layer)
    head = (f"<b>{esc(la.layer)}</b> · {len(la.channels)} channels · top {k} of {esc(fmt(a.get('count')))} inputs"
            + (f" · bottom {a['bottom_scores'].shape[1]}" if "bottom_scores" in a else ""))
    pages = ""
    if la.pages:
        figures = "".join(f'<figure><a href="{esc(src(p, base))}"><img loading="lazy" src="{esc(src(p, base))}" '
                          f'alt="{esc(p.name)}"></a><figcaption>{esc(p.name)}</figcaption></figure>' for p in la.pages)
        pages = f'<details class="atlas-pages"><summary>Atlas PNGs ({len(la.pages)})</summary>{figures}</details>'
    blocks = "".join(channel_html(la, row, base, prefix, drives.get(int(c), [])) for row, c in enumerate(la.channels))
    return (f'<details class="atlas-layer" open id="{esc(ids(prefix, la.layer))}" data-layer="{esc(la.layer)}" '
            f'data-label="{esc(la.layer)}"><summary>{head}</summary>{pages}{blocks}</details>')


def channel_drives(atlas: Atlas, layer: str) -> Dict[int, List[Tuple[float, int, str]]]:
    """channel -> [(mean contribution, class, name)] of the classes listing it among their top channels."""
    rel = atlas.relevance.get(layer, {})
    out: Dict[int, List[Tuple[float, int, str]]] = defaultdict(list)
    if "top_channels" in rel and "top_values" in rel:
        for i, (chans, values) in enumerate(zip(rel["top_channels"], rel["top_values"])):
            for c, v in zip(chans, values):
                if c >= 0:
                    out[int(c)].append((float(v), i, atlas.class_name(i)))
    return {c: sorted(v, key=lambda t: (-t[0], t[1])) for c, v in out.items()}


def class_layers(atlas: Atlas, base: Path, prefix: str) -> List[dict]:
    """What the page script needs to draw a class's table, per relevance layer: its name, the
    anchor of its channels, the channels with examples, its strips' folder URL, the thumbnail width."""
    examples = {la.layer: la for la in atlas.layers}
    out = []
    for layer in atlas.relevance:
        la = examples.get(layer)
        entry = {"name": layer, "anchor": ids(prefix, layer), "channels": [], "strips": None, "thumb": 0}
        if la is not None:
            entry["channels"] = [int(c) for c in la.channels]
            if la.strips:
                entry["strips"] = src(next(iter(la.strips.values())).parent, base) + "/"
                entry["thumb"] = min(THUMBS, la.arrays["top_scores"].shape[1]) * THUMB
        out.append(entry)
    return out


def class_html(atlas: Atlas, i: int, count: int, prefix: str) -> str:
    """One class's closed <details>; its table (per layer its top channels, their mean contribution,
    links to their blocks and their first patches) is drawn by the page script when it is opened,
    from `data-top`: "<layer index>:<channel>:<mean contribution>" entries."""
    entries = []
    for li, rel in enumerate(atlas.relevance.values()):
        if "top_channels" in rel and "top_values" in rel:
            entries += [f"{li}:{int(c)}:{fmt(float(v))}" for c, v in zip(rel["top_channels"][i], rel["top_values"][i])
                        if c >= 0]
    name = atlas.class_name(i)
    body = f'<div class="atlas-top" data-top="{" ".join(entries)}"></div>' if entries else \
        '<p class="muted">(no channels)</p>'
    return (f'<details class="atlas-class" id="{esc(ids(prefix, cls=i))}" data-class="{i}" '
            f'data-name="{esc(name)}" data-label="{esc(f"class {i}: {name}")}">'
            f"<summary>{i} · {esc(name)} · {count} inputs</summary>{body}</details>")


def classes_html(atlas: Atlas, base: Path, prefix: str) -> str:
    """Every class with inputs (count > 0 in any layer), in index order; those without are counted."""
    counts = np.max(np.stack([np.asarray(r["count"]) for r in atlas.relevance.values() if "count" in r]), axis=0) \
        if any("count" in r for r in atlas.relevance.values()) else np.zeros(0, np.int64)
    shown = [i for i, n in enumerate(counts) if n > 0]
    blocks = "".join(class_html(atlas, i, int(counts[i]), prefix) for i in shown)
    empty = len(counts) - len(shown)
    note = f"; {empty} without inputs not listed" if empty else ""
    layers = esc(json.dumps(class_layers(atlas, base, prefix), separators=(",", ":")))
    return (f'<details class="atlas-classes"{" open" if len(shown) <= CLASSES_OPEN else ""} id="{prefix}atlas-classes" '
            f'data-layers="{layers}"><summary><b>Classes</b>: top channels by mean Grad-CAM contribution '
            f"({len(shown)} classes{note})</summary>{blocks}</details>")


def atlas_section(atlas: Atlas, base: Path, prefix: str) -> str:
    """The atlas of one run: the jump box, the layers' channel blocks, the class blocks. Anchors
    start with `prefix` ("" for a run's own page, "<run anchor>-" in a sweep's)."""
    names = sorted({atlas.class_name(i) for r in atlas.relevance.values() for i, n in enumerate(r.get("count", []))
                    if n > 0})
    out = [f'<div class="atlas" id="{prefix}atlas">', find_form(prefix, names)]
    if not atlas.layers:
        out.append(f'<p class="muted">(no {EXAMPLES} summary: channels are not linked to examples)</p>')
    out += [layer_html(la, atlas, base, prefix) for la in atlas.layers]
    if atlas.relevance:
        out.append(classes_html(atlas, base, prefix))
    out.append("</div>")
    return "\n".join(out)
