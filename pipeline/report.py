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
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import quote

import numpy as np
import yaml

from pipeline.store import MAPS, Column, open_run

MAX_IMAGES = 12
BLOCK_BYTES = 32 << 20  # rows read at a time for the statistics: about this many bytes


class ReportError(Exception):
    """Not a run or sweep dir, or a run dir whose maps.h5 cannot be read (exit code 2)."""


class Raw(str):
    """HTML already escaped (or built from escaped parts): inserted as is."""


def esc(value) -> str:
    return value if isinstance(value, Raw) else html.escape("" if value is None else str(value))


def natural_key(text: str) -> list:
    """'run10' after 'run9': digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", text)]


def fmt(value) -> str:
    """Numbers for a table cell: 4 significant digits, '' for None."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{float(value):.4g}"
    return str(value)


# -- reading a run ------------------------------------------------------------------------------
@dataclass
class Stats:
    dataset: str
    shape: Tuple[int, ...]  # valid rows first
    dtype: str
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
    stats = Stats(col.name, col.shape, col.stored_dtype)
    for _, block in col.blocks(BLOCK_BYTES):
        stats.add(block)
    return stats


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
class Image:
    path: Path
    caption: str
    alt: str


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


def split_override(text: str) -> Tuple[str, str]:
    """`+key=value` -> (key, value); `~key` -> (key, '(deleted)')."""
    left, sep, right = text.partition("=")
    key = left.lstrip("+~")
    if left.startswith("~"):
        return key, "(deleted)" + (f" {right}" if sep else "")
    return key, right


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
        for folder in sorted((d for d in png.iterdir() if d.is_dir()), key=lambda d: natural_key(d.name)):
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


def anchors(names: Sequence[str]) -> List[str]:
    """`run-<n>` for a job dir named by its number, else `run-<path with - for other chars>`; unique."""
    out: List[str] = []
    for name in names:
        base = "run-" + (re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-") or "0")
        anchor, i = base, 2
        while anchor in out:
            anchor, i = f"{base}-{i}", i + 1
        out.append(anchor)
    return out


# -- writing the page ---------------------------------------------------------------------------
CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; padding: 1em 1.5em;
       max-width: 1400px; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 2px solid #ddd; }
h3 { margin-top: 1.4em; } h4 { margin: 1em 0 .3em; }
code, pre { font: 13px/1.35 ui-monospace, Menlo, Consolas, monospace; }
pre { background: #f5f5f7; padding: .8em; overflow-x: auto; max-height: 40em; }
table { border-collapse: collapse; margin: .4em 0 1em; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f5f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; max-width: 100%; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; word-break: break-all; }
.dirty { color: #b00020; font-weight: 600; } .muted { color: #6e6e73; } .error { color: #b00020; }
#image-status { padding: .3em .6em; background: #eef6ee; display: inline-block; }
#image-status.bad { background: #fdecea; color: #b00020; }
img { max-width: 100%; height: auto; display: block; }
figure { margin: 0; }
figure figcaption { font-size: 13px; color: #6e6e73; margin-top: .2em; word-break: break-all; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 1em; }
.wide figure { margin-bottom: 1em; }
details > summary { cursor: pointer; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = function (img) { return img.complete && img.naturalWidth > 0; };
  var loaded = images.filter(ok);
  var missing = images.filter(function (img) { return !ok(img); });
  var status = document.getElementById("image-status");
  var text = loaded.length + " of " + images.length + " images loaded";
  if (missing.length) {
    text += "; not loaded (moved or deleted?): " +
      missing.map(function (img) { return img.getAttribute("src"); }).join(", ");
    status.className = "bad";
  }
  status.textContent = text;
});
"""


def table(headers: Sequence[str], rows: Iterable[Sequence], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def src(path: Path, base: Path) -> str:
    """URL of `path` relative to the page's dir `base`, percent-encoded (spaces, '#', '%', ...)."""
    rel = Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()
    return quote(rel, safe="/-._~")


def png_size(path: Path) -> Optional[Tuple[int, int]]:
    """(width, height) from a PNG's IHDR chunk, without decoding it; None if it is not a PNG."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def figure(image: Image, base: Path) -> str:
    """The image (a link to it at full size) and its caption; width/height reserve its space."""
    url = esc(src(image.path, base))
    size = png_size(image.path)
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    return (f'<figure><a href="{url}"><img loading="eager" src="{url}"{dims} alt="{esc(image.alt)}"></a>'
            f"<figcaption>{esc(image.caption)}</figcaption></figure>")


def grid(images: Sequence[Image], base: Path) -> str:
    """A grid whose columns fit the widest image (up to 700 px), so wide grids get a row each."""
    widths = [size[0] for size in map(png_size, (i.path for i in images)) if size]
    column = min(max(widths, default=300), 700)
    return (f'<div class="grid" style="grid-template-columns: repeat(auto-fill, minmax(min({column}px, 100%), 1fr))">'
            + "".join(figure(i, base) for i in images) + "</div>")


def facts(pairs: Sequence[Tuple[str, object]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in pairs) + "</dl>"


def run_section(run: Run, base: Path, max_images: int, level: int = 2) -> str:
    h, hh = f"h{level}", f"h{level + 1}"
    a = run.attrs
    out = [f'<section id="{esc(run.anchor)}">', f"<{h}>Run {esc(run.name)}</{h}>"]
    if run.error:
        out.append(f'<p class="error">{esc(run.error)}</p>')
    dirty = a.get("git_dirty")
    commit = Raw(esc(a.get("git_commit", "(not recorded)"))
                 + ("" if dirty is None else ' <span class="dirty">dirty (uncommitted changes)</span>' if dirty
                    else ' <span class="muted">clean</span>'))
    out.append(facts([
        ("directory", Raw(f"<code>{esc(run.path)}</code>")),
        ("model", a.get("model", "")), ("layers", a.get("layers", "")), ("shard", run.shard),
        ("rows", fmt(run.rows)), ("skipped", fmt(run.skipped_rows or 0)),
        ("git commit", commit), ("device", a.get("device", "(not recorded)")),
        ("seed", fmt(a.get("seed", "(not recorded)"))), ("host", a.get("host", "(not recorded)")),
        ("command", Raw(f"<code>{esc(a.get('command', '(not recorded)'))}</code>")),
    ]))

    out.append(f"<{hh}>Overrides</{hh}>")
    if run.overrides is None:
        out.append('<p class="muted">(none recorded)</p>')
    elif not run.overrides:
        out.append('<p class="muted">(none: the default config)</p>')
    else:
        out.append("<ul>" + "".join(f"<li><code>{esc(o)}</code></li>" for o in run.overrides) + "</ul>")
    out.append(f"<details><summary>Resolved config</summary><pre>{esc(a.get('config', '(not recorded)'))}</pre></details>")

    out.append(f"<{hh}>Timings</{hh}>")
    if run.attempts:
        rows = []
        for i, t in enumerate(run.attempts):
            status = ("finished" if t.get("finished") else
                      "not finished (interrupted, or still running)" if i == len(run.attempts) - 1 else "interrupted")
            rows.append([i + 1, t.get("started", ""), t.get("host", ""), fmt(t.get("seconds")), fmt(t.get("done")),
                         fmt(t.get("skipped")), fmt(t.get("rows")), fmt(t.get("images_per_s")), status])
        out.append(table(["attempt", "started", "host", "seconds", "done", "skipped", "rows", "images/s", "status"],
                         rows, numeric=(0, 3, 4, 5, 6, 7)))
    else:
        out.append('<p class="muted">(no attempts recorded)</p>')

    out.append(f"<{hh}>Skipped inputs</{hh}>")
    if run.skipped:
        out.append(table(["id", "source", "frame", "reason"], run.skipped))
    else:
        out.append("<p>none</p>")

    out.append(f"<{hh}>Map statistics</{hh}>")
    if run.stats:
        out.append('<p class="muted">Over the valid rows; NaN and inf values are left out and counted.</p>')
        out.append(table(
            ["dataset", "shape", "dtype", "mean", "std", "min", "max", "non-finite"],
            [[s.dataset, "\u00d7".join(map(str, s.shape)), s.dtype, fmt(s.mean), fmt(s.std), fmt(s.min),
              fmt(s.max), fmt(s.nonfinite)] for s in run.stats],
            numeric=(3, 4, 5, 6, 7)))
    else:
        out.append('<p class="muted">(no map datasets)</p>')

    versions = _json(a.get("versions"), None)
    out.append(f"<{hh}>Package versions</{hh}>")
    if isinstance(versions, dict):
        out.append(table(["package", "version"], sorted(versions.items())))
    else:
        out.append(f'<p class="muted">{esc(a.get("versions", "(not recorded)"))}</p>')

    out.append(f"<{hh}>Images</{hh}>")
    if run.run_images:
        out.append('<div class="wide">' + "".join(figure(i, base) for i in run.run_images) + "</div>")
    for technique, images in run.technique_images.items():
        shown = images[:max_images]
        more = len(images) - len(shown)
        note = f' <span class="muted">({len(images)} inputs; {more} more not shown)</span>' if more > 0 else ""
        out.append(f"<h{level + 2}>{esc(technique)}{note}</h{level + 2}>")
        out.append(grid(shown, base))
    if not run.run_images and not run.technique_images:
        out.append('<p class="muted">(no PNGs in this run dir)</p>')
    out.append("</section>")
    return "\n".join(out)


def sweep_table(runs: Sequence[Run]) -> Tuple[List[str], str]:
    """(swept keys, HTML): one row per run, one column per overridden key whose value differs
    between runs (every overridden key when none differs); keys set alike in every run are listed
    above the table instead."""
    keys: List[str] = []
    for run in runs:
        for o in run.overrides or []:
            key = split_override(o)[0]
            if key not in keys:
                keys.append(key)
    values_of = [dict(split_override(o) for o in run.overrides or []) for run in runs]
    varying = [k for k in keys if len({v.get(k) for v in values_of}) > 1]
    common = [f"{k}={values_of[0].get(k)}" for k in keys if k not in varying] if varying else []
    keys = varying or keys
    head = ["run", *keys, "rows", "skipped", "images/s", "maps (mean)"]
    rows = []
    for run in runs:
        values = dict(split_override(o) for o in run.overrides or [])
        means = Raw("<br>".join(f"<code>{esc(s.dataset)}</code>={esc(fmt(s.mean))}" for s in run.stats))
        link = Raw(f'<a href="#{esc(run.anchor)}">{esc(run.name)}</a>')
        if run.error:
            means = Raw(f'<span class="error">{esc(run.error)}</span>')
        rows.append([link, *(values.get(k, "") for k in keys), fmt(run.rows), fmt(run.skipped_rows),
                     fmt(run.images_per_s), means])
    n = len(keys)
    same = ("<p>Same in every run: " + " ".join(f"<code>{esc(c)}</code>" for c in common) + "</p>") if common else ""
    return keys, same + table(head, rows, numeric=(n + 1, n + 2, n + 3))


def page(title: str, intro: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>{esc(title)}</h1>
{intro}
<p id="image-status">Checking images (needs JavaScript)&hellip;</p>
</header>
{body}
<script>{SCRIPT}</script>
</body>
</html>
"""


def build(root: Path, out: Path, max_images: int = MAX_IMAGES) -> str:
    """The page's HTML for run or sweep dir `root`, with paths relative to `out`'s dir."""
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
        return page(f"Run report: {root.resolve().name}", intro, run_section(run, base, max_images))
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
    body = ["<h2>Runs</h2>", summary] + [run_section(r, base, max_images, level=2) for r in runs]
    return page(f"Sweep report: {root.resolve().name}", "\n".join(intro), "\n".join(body))


def _sweep_overrides(root: Path) -> List[str]:
    """The sweep's command-line overrides, from Hydra's multirun.yaml."""
    try:
        data = yaml.safe_load((root / "multirun.yaml").read_text())
        task = data["hydra"]["overrides"]["task"]
        return [str(t) for t in task] if isinstance(task, list) else []
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return []


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
