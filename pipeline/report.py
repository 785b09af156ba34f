"""`python -m pipeline.report DIR [--out report.html] [--max-images 12]`: one self-contained HTML page
for a run dir (one with maps.h5) or a sweep dir (any dir with run dirs below it).

The page has inline CSS and one small inline script, and nothing external: the PNG grids the runs
already drew are referenced by paths relative to the HTML file, so the page works wherever the
run dirs are, as long as it stays beside them. maps.h5 is only read (without HDF5 file locking, so
a report can be made while a run is still writing); map statistics are computed a block of rows
at a time, never a whole dataset in memory.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from pipeline.io.atlas import ATLAS_DIR
from pipeline.report_atlas import Atlas, atlas_section, read_atlas, write_atlas_strips
from pipeline.report_html import Image, Raw, esc, facts, figure, fmt, grid, page, table
from pipeline.report_leaderboard import LEADERBOARD_CSS, leaderboard_section
from pipeline.report_sweep import _sweep_overrides, anchors, sweep_table
from pipeline.store import MAPS, Column, open_run
from pipeline.store.layout import split_map_name

MAX_IMAGES = 12
BLOCK_BYTES = 32 << 20  # rows read at a time for the statistics: about this many bytes


class ReportError(Exception):
    """Not a run or sweep dir, or a run dir whose maps.h5 cannot be read (exit code 2)."""


def natural_key(text: str) -> list:
    """'run10' after 'run9': digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", text)]


# -- reading a run ------------------------------------------------------------------------------
@dataclass
class Stats:
    dataset: str
    shape: Tuple[int, ...]  # valid rows first
    dtype: str
    declared: str = ""  # "<kind> <shape>" as its technique declares the output; "evaluation" for a metric
    count: int = 0  # finite values
    nonfinite: int = 0  # NaN and inf values, left out of the statistics
    mean: Optional[float] = None
    std: Optional[float] = None
    min: Optional[float] = None
    max: Optional[float] = None
    _m2: float = field(default=0.0, repr=False)  # sum of squared deviations from the mean

    def add(self, block: np.ndarray) -> None:
        """Merge one block of values (Chan et al.'s parallel update of mean and sum of squares)."""
        values = np.asarray(block, dtype=np.float64).ravel()
        finite = np.isfinite(values)
        self.nonfinite += int(values.size - np.count_nonzero(finite))
        if not finite.all():
            values = values[finite]
        n = int(values.size)
        if n == 0:
            return
        mean = float(values.mean())
        m2 = float(np.square(values - mean).sum())
        lo, hi = float(values.min()), float(values.max())
        if self.count == 0:
            self.count, self.mean, self._m2, self.min, self.max = n, mean, m2, lo, hi
        else:
            total = self.count + n
            delta = mean - self.mean
            self.mean += delta * n / total
            self._m2 += m2 + delta * delta * self.count * n / total
            self.count = total
            self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.std = math.sqrt(self._m2 / self.count)


def column_stats(col: Column) -> Stats:
    """Statistics of a row dataset's committed rows, a block of rows at a time."""
    stats = Stats(col.name, col.shape, col.stored_dtype, declared(col.name))
    for _, block in col.blocks(BLOCK_BYTES):
        stats.add(block)
    return stats


def declared(name: str) -> str:
    """How the technique of a map dataset declares it ("heatmap [N, K, h, w]"), from the registry."""
    from pipeline.techniques import REGISTRY

    parts = split_map_name(name)
    if parts is None:
        return ""
    technique, _, output, metric = parts
    if metric is not None:
        return f"evaluation ({metric})"
    decl = getattr(REGISTRY.get(technique), "outputs", {}).get(output)
    return f"{decl.kind} {decl.shape}" if decl is not None else "(not declared)"


def dataset_stats(ds, rows: int) -> Stats:
    """column_stats of the first `rows` rows of an (h5py) dataset."""
    return column_stats(Column(ds, rows))


def _json(text, default):
    if text is None:
        return default
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return default


@dataclass
class Run:
    path: Path
    name: str  # path relative to the report's dir (sweep) or the dir's name (single run)
    anchor: str
    overrides: Optional[List[str]] = None  # None: no .hydra/overrides.yaml
    attrs: Dict[str, object] = field(default_factory=dict)  # provenance (model, layers, git commit, ...) and config
    rows: Optional[int] = None  # committed rows; None: maps.h5 unreadable
    skipped_rows: Optional[int] = None
    shard: str = ""
    attempts: List[dict] = field(default_factory=list)
    skipped: List[Tuple[str, str, str, str]] = field(default_factory=list)
    stats: List[Stats] = field(default_factory=list)
    run_images: List[Image] = field(default_factory=list)
    technique_images: Dict[str, List[Image]] = field(default_factory=dict)
    atlas: Optional[Atlas] = None  # summary/dataset_examples and/or summary/channel_relevance
    error: Optional[str] = None

    @property
    def images_per_s(self) -> Optional[float]:
        """From the last finished attempt that computed inputs (a resume with nothing left to do has none)."""
        for a in reversed(self.attempts):
            if a.get("finished") and a.get("images_per_s") is not None:
                return a["images_per_s"]
        return None


def read_overrides(run_dir: Path) -> Optional[List[str]]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return [str(x) for x in data] if isinstance(data, list) else []


def read_run(run_dir: Path, name: str, anchor: str) -> Run:
    """Everything the page shows about one run; an unreadable maps.h5 is recorded in `error`."""
    run = Run(run_dir, name, anchor, overrides=read_overrides(run_dir))
    pngs: Optional[List[Tuple[str, str]]] = None  # (id, PNG name) per row; None: a run file without them
    try:
        with open_run(run_dir) as f:
            run.attrs = {**f.provenance(), "config": f.config} if f.config is not None else f.provenance()
            run.rows, run.skipped_rows = f.rows, f.skipped_rows
            run.shard = f.shard if f.is_pipeline_run else ""
            run.attempts = f.attempts()
            run.skipped = [(s.id, s.source, str(s.frame), s.reason) for s in f.skipped()]
            run.stats = [column_stats(col) for name, col in sorted(f.map_columns().items(),
                                                                    key=lambda kv: natural_key(kv[0]))]
            pngs = f.pngs()
            run.atlas = read_atlas(f, run_dir)
    except (OSError, KeyError, ValueError, RuntimeError) as err:  # unreadable or half-written
        run.error = f"cannot read {run_dir / MAPS}: {err}"
    if "config" not in run.attrs and (run_dir / ".hydra" / "config.yaml").is_file():
        run.attrs["config"] = (run_dir / ".hydra" / "config.yaml").read_text()
    png = run_dir / "png"
    for folder in (png, run_dir / "plots"):
        for path in sorted(folder.glob("*.png"), key=lambda p: natural_key(p.name)):
            rel = path.relative_to(run_dir).as_posix()
            run.run_images.append(Image(path, rel, f"{rel} of run {name}"))
    if png.is_dir():
        for folder in sorted((d for d in png.iterdir() if d.is_dir() and d.name != ATLAS_DIR),
                             key=lambda d: natural_key(d.name)):  # png/atlas/: in the atlas section
            if pngs is not None:  # in row order, one per drawn row: a PNG deleted since shows as missing
                run.technique_images[folder.name] = [
                    Image(folder / name, item, f"{folder.name} maps of {item}") for item, name in pngs if name]
                continue
            files = sorted(folder.rglob("*.png"), key=lambda p: natural_key(p.relative_to(folder).as_posix()))
            run.technique_images[folder.name] = [
                Image(p, p.relative_to(folder).as_posix().removesuffix(".png"),
                      f"{folder.name} maps of {p.relative_to(folder).as_posix().removesuffix('.png')}")
                for p in files]
    return run


def find_runs(root: Path) -> List[Path]:
    """Run dirs (with maps.h5) at or below `root`, in natural order of their relative paths."""
    if (root / "maps.h5").is_file():
        return [root]
    found = [p.parent for p in root.rglob("maps.h5") if p.is_file()]
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


# -- writing the page ---------------------------------------------------------------------------
def run_section(run: Run, base: Path, max_images: int, level: int = 2) -> str:
    """One run's section: facts, overrides and config, timings, skipped inputs, map statistics,
    package versions, images and, when the run has one, its atlas."""
    h = f"h{level}"
    out = [f'<section id="{esc(run.anchor)}">', f"<{h}>Run {esc(run.name)}</{h}>"]
    if run.error:
        out.append(f'<p class="error">{esc(run.error)}</p>')
    out.append(_facts(run))
    hh = f"h{level + 1}"
    for title, part in (("Overrides", _overrides(run)), ("Timings", _timings(run)), ("Skipped inputs", _skipped(run)),
                        ("Map statistics", _statistics(run)), ("Package versions", _versions(run)),
                        ("Images", _images(run, base, max_images, level + 2))):
        out += [f"<{hh}>{title}</{hh}>", part]
    if run.atlas is not None:
        prefix = "" if run.anchor == "run" else f"{run.anchor}-"
        out += [f'<{hh} id="{esc(prefix)}atlas-top">Atlas</{hh}>', atlas_section(run.atlas, base, prefix)]
    out.append("</section>")
    return "\n".join(out)


def _facts(run: Run) -> str:
    a = run.attrs
    dirty = a.get("git_dirty")
    commit = Raw(esc(a.get("git_commit", "(not recorded)"))
                 + ("" if dirty is None else ' <span class="dirty">dirty (uncommitted changes)</span>' if dirty
                    else ' <span class="muted">clean</span>'))
    return facts([
        ("directory", Raw(f"<code>{esc(run.path)}</code>")),
        ("model", a.get("model", "")), ("layers", a.get("layers", "")), ("shard", run.shard),
        ("rows", fmt(run.rows)), ("skipped", fmt(run.skipped_rows or 0)),
        ("git commit", commit), ("device", a.get("device", "(not recorded)")),
        ("seed", fmt(a.get("seed", "(not recorded)"))), ("host", a.get("host", "(not recorded)")),
        ("command", Raw(f"<code>{esc(a.get('command', '(not recorded)'))}</code>")),
    ])


def _overrides(run: Run) -> str:
    if run.overrides is None:
        listed = '<p class="muted">(none recorded)</p>'
    elif not run.overrides:
        listed = '<p class="muted">(none: the default config)</p>'
    else:
        listed = "<ul>" + "".join(f"<li><code>{esc(o)}</code></li>" for o in run.overrides) + "</ul>"
    config = esc(run.attrs.get("config", "(not recorded)"))
    return listed + f"<details><summary>Resolved config</summary><pre>{config}</pre></details>"


def _timings(run: Run) -> str:
    if not run.attempts:
        return '<p class="muted">(no attempts recorded)</p>'
    rows = []
    for i, t in enumerate(run.attempts):
        status = ("finished" if t.get("finished") else
                  "not finished (interrupted, or still running)" if i == len(run.attempts) - 1 else "interrupted")
        rows.append([i + 1, t.get("started", ""), t.get("host", ""), fmt(t.get("seconds")), fmt(t.get("done")),
                     fmt(t.get("skipped")), fmt(t.get("rows")), fmt(t.get("images_per_s")), status])
    return table(["attempt", "started", "host", "seconds", "done", "skipped", "rows", "images/s", "status"],
                 rows, numeric=(0, 3, 4, 5, 6, 7))


def _skipped(run: Run) -> str:
    return table(["id", "source", "frame", "reason"], run.skipped) if run.skipped else "<p>none</p>"


def _statistics(run: Run) -> str:
    if not run.stats:
        return '<p class="muted">(no map datasets)</p>'
    return ('<p class="muted">Over the valid rows; NaN and inf values are left out and counted.</p>' + table(
        ["dataset", "declared as", "shape", "dtype", "mean", "std", "min", "max", "non-finite"],
        [[s.dataset, s.declared, "\u00d7".join(map(str, s.shape)), s.dtype, fmt(s.mean), fmt(s.std), fmt(s.min),
          fmt(s.max), fmt(s.nonfinite)] for s in run.stats],
        numeric=(4, 5, 6, 7, 8)))


def _versions(run: Run) -> str:
    versions = _json(run.attrs.get("versions"), None)
    if isinstance(versions, dict):
        return table(["package", "version"], sorted(versions.items()))
    return f'<p class="muted">{esc(run.attrs.get("versions", "(not recorded)"))}</p>'


def _images(run: Run, base: Path, max_images: int, level: int) -> str:
    out = []
    if run.run_images:
        out.append('<div class="wide">' + "".join(figure(i, base) for i in run.run_images) + "</div>")
    for technique, images in run.technique_images.items():
        shown = images[:max_images]
        more = len(images) - len(shown)
        note = f' <span class="muted">({len(images)} inputs; {more} more not shown)</span>' if more > 0 else ""
        out.append(f"<h{level}>{esc(technique)}{note}</h{level}>")
        out.append(grid(shown, base))
    if not run.run_images and not run.technique_images:
        atlas = (run.path / "png" / ATLAS_DIR).is_dir()
        out.append(f'<p class="muted">({"only the atlas PNGs, shown in the Atlas section" if atlas else "no PNGs in this run dir"})</p>')
    return "\n".join(out)


def build(root: Path, out: Path, max_images: int = MAX_IMAGES) -> str:
    """The page's HTML for run or sweep dir `root`, with paths relative to `out`'s dir; a run with
    an atlas gets its patch strips written to `<out stem>-atlas/` (write_atlas_strips)."""
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory")
    base = out.parent
    dirs = find_runs(root)
    if not dirs:
        raise ReportError(f"{root} is not a run dir (no maps.h5) nor a sweep dir (no maps.h5 in any subdir)")
    if dirs == [root]:
        run = read_run(root, root.resolve().name, "run")
        if run.error:
            raise ReportError(run.error)
        intro = f'<p class="muted">Run dir <code>{esc(root.resolve())}</code></p>'
        extra = with_css(write_atlas_strips([run], out), LEADERBOARD_CSS)
        body = leaderboard_section([run]) + run_section(run, base, max_images)
        return page(f"Run report: {root.resolve().name}", intro, body, **extra)
    names = [d.relative_to(root).as_posix() for d in dirs]
    runs = [read_run(d, n, a) for d, n, a in zip(dirs, names, anchors(names))]
    keys, summary = sweep_table(runs)
    intro = [f'<p class="muted">Sweep dir <code>{esc(root.resolve())}</code>: {len(runs)} runs'
             f'{"" if not keys else ", swept keys: " + esc(", ".join(keys))}.</p>']
    sweep_overrides = _sweep_overrides(root)
    if sweep_overrides:
        intro.append("<p>Sweep: " + " ".join(f"<code>{esc(o)}</code>" for o in sweep_overrides) + "</p>")
    lost = sorted((p.parent.parent.relative_to(root).as_posix() for p in root.rglob(".hydra/overrides.yaml")
                   if not (p.parent.parent / "maps.h5").is_file() and p.parent.parent != root), key=natural_key)
    if lost:
        intro.append(f'<p class="error">Job dirs without maps.h5 (failed before writing?): {esc(", ".join(lost))}</p>')
    extra = with_css(write_atlas_strips(runs, out), LEADERBOARD_CSS)
    body = ["<h2>Runs</h2>", summary, leaderboard_section(runs)] + [run_section(r, base, max_images, level=2) for r in runs]
    return page(f"Sweep report: {root.resolve().name}", "\n".join(intro), "\n".join(body), **extra)


def with_css(extra: Dict[str, str], css: str) -> Dict[str, str]:
    """page()'s css/script extras with `css` added."""
    return {**extra, "css": extra.get("css", "") + css}


def write_report(root: str | Path, out: str | Path | None = None, max_images: int = MAX_IMAGES) -> Path:
    """Write the report of `root` (default `<root>/report.html`); returns its path. Raises ReportError."""
    root = Path(root).expanduser()
    out = Path(out).expanduser() if out is not None else root / "report.html"
    if out.is_dir():
        raise ReportError(f"--out {out} is a directory; name the HTML file")
    text = build(root, out, max_images)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.report",
        description="Write one self-contained HTML report of a run dir (with maps.h5) or a sweep dir.")
    parser.add_argument("dir", help="run dir or sweep dir")
    parser.add_argument("--out", help="HTML file to write (default: DIR/report.html); image paths are relative to it")
    parser.add_argument("--max-images", type=int, default=MAX_IMAGES,
                        help=f"per-input PNGs shown per technique and run (default {MAX_IMAGES})")
    args = parser.parse_args(argv)
    if args.max_images < 0:
        parser.error("--max-images must be >= 0")
    try:
        path = write_report(args.dir, args.out, args.max_images)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
