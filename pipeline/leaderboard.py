"""`python -m pipeline.leaderboard DIR [DIR ...] [--csv FILE] [--metrics a,b]`: which explanation
method scores best on the metrics its runs computed (`evaluate.*`).

DIR is a run dir (with maps.h5), a sweep dir (run dirs below it) or several of either. Every metric
column `<technique>/<layer>/<output>.<metric>` of every run becomes one table column: a metric
[N, K] as it is, `sanity` [N, K, steps] as its mean over steps, and a curve [N, K, P] (deletion,
insertion, ROAD) through its own `<metric>_auc` column (without one it is left out). One row per
method (technique, layer, output), with the run's distinguishing overrides when the same method is
in several runs. A cell is the mean over inputs of each input's mean over its targets, NaN left
out, with a 95% Student t confidence interval over those per-input values and their count n.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from pipeline.report_sweep import split_override
from pipeline.store import open_run

# Which value is better, per metric name (the shared contract of issue 14).
DIRECTIONS: Dict[str, str] = {
    "deletion_auc": "lower",
    "insertion_auc": "higher",
    "road_morf_auc": "lower",
    "road_lerf_auc": "higher",
    "road_combined": "higher",
    "avg_drop": "lower",
    "increase": "higher",
    "pointing": "higher",
    "energy_pointing": "higher",
    "gini": "higher",
    "sanity": "lower",  # rank correlation with the maps of a randomized model: lower depends more on it
}
CURVES = ("deletion", "insertion", "road_morf", "road_lerf")  # [N, K, P], summarised by <name>_auc
STEP_MEANS = ("sanity",)  # [N, K, steps]: the mean over steps
CONFIDENCE = 0.95
CSV_FIELDS = ("method", "layer", "output", "metric", "mean", "ci_low", "ci_high", "n", "best")


class LeaderboardError(Exception):
    """No runs, no metric columns, or an unknown --metrics name (exit code 2)."""


# -- statistics ---------------------------------------------------------------------------------
def _t_two_sided(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer `df` (Abramowitz & Stegun 26.7.3-4, a finite sum)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:
        term, total = math.cos(theta), 0.0
        for j in range(1, (df - 1) // 2 + 1):  # cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ...
            total += term
            term *= c2 * (2 * j) / (2 * j + 1)
        return (2 / math.pi) * (theta + s * total) if df > 1 else 2 * theta / math.pi
    term, total = 1.0, 0.0
    for j in range(1, df // 2 + 1):  # 1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...
        total += term
        term *= c2 * (2 * j - 1) / (2 * j)
    return s * total


@lru_cache(maxsize=None)
def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student t critical value: P(|T| < t) = confidence, for integer df >= 1."""
    if df < 1:
        raise ValueError(f"df={df}: need at least 2 values")
    if df > 1000:  # Cornish-Fisher expansion around the normal quantile (error < 1e-11 here)
        z = _normal_quantile(0.5 + confidence / 2)
        return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
                + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))
    lo, hi = 0.0, 1.0
    while _t_two_sided(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _t_two_sided(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


def _normal_quantile(p: float) -> float:
    """The standard normal quantile, by bisection on erf."""
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Cell:
    mean: float
    ci_low: float  # NaN when n < 2
    ci_high: float
    n: int  # inputs with at least one finite value
    best: bool = False


def summarize(per_input: np.ndarray) -> Optional[Cell]:
    """Mean and 95% t interval of the finite values; None when there is none."""
    values = np.asarray(per_input, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    n = int(values.size)
    if n == 0:
        return None
    mean = float(values.mean())
    if n < 2:
        return Cell(mean, math.nan, math.nan, n)
    half = t_quantile(n - 1) * float(values.std(ddof=1)) / math.sqrt(n)
    return Cell(mean, mean - half, mean + half, n)


def per_input(values: np.ndarray, metric: str) -> np.ndarray:
    """[N]: each input's mean over its targets (and over steps for `sanity`), NaN left out."""
    a = np.asarray(values, dtype=np.float64)
    if metric in STEP_MEANS and a.ndim == 3:
        a = _nanmean(a, axis=2)
    return _nanmean(a.reshape(a.shape[0], -1), axis=1) if a.ndim > 1 else a


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    """nanmean without the all-NaN warning (NaN where a slice has no finite value)."""
    finite = np.isfinite(a)
    count = finite.sum(axis=axis)
    total = np.where(finite, a, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# -- collecting runs ----------------------------------------------------------------------------
@dataclass
class RunDir:
    path: Path
    name: str
    overrides: Optional[List[str]]  # None: none recorded


@dataclass
class Entry:
    """One table row: a method of one run, its cells by metric and its mean curves by curve name."""

    technique: str
    layer: str
    output: str
    run: str
    tag: str = ""  # the run's distinguishing overrides when the method is in several runs
    cells: Dict[str, Cell] = field(default_factory=dict)
    curves: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (x, mean y)

    @property
    def method(self) -> str:
        return f"{self.technique} [{self.tag}]" if self.tag else self.technique

    @property
    def label(self) -> str:
        return f"{self.method} {self.layer}/{self.output}"


@dataclass
class Board:
    entries: List[Entry]
    metrics: List[str]  # the columns, in order
    problems: List[str] = field(default_factory=list)  # runs that could not be read

    def direction(self, metric: str) -> Optional[str]:
        return DIRECTIONS.get(metric)


def road_x(config: Optional[str], points: int) -> np.ndarray:
    """ROAD's percentages as fractions: the run's evaluate.road_percentages, else 10..90-like."""
    try:
        found = (yaml.safe_load(config or "") or {}).get("evaluate", {}).get("road_percentages")
    except (yaml.YAMLError, AttributeError):
        found = None
    if isinstance(found, list) and len(found) == points:
        return np.asarray(found, dtype=np.float64) / 100
    return np.arange(1, points + 1, dtype=np.float64) / (points + 1)


def read_entries(run: RunDir) -> List[Entry]:
    """The run's methods with a cell per table metric and a mean curve per curve metric."""
    entries: Dict[Tuple[str, str, str], Entry] = {}
    with open_run(run.path) as f:
        metrics = f.metrics()
        config = f.config
        for (technique, layer, output, metric), col in metrics.items():
            entry = entries.setdefault((technique, layer, output), Entry(technique, layer, output, run.name))
            values = np.asarray(col[:], dtype=np.float64)
            if values.ndim == 3 and metric not in STEP_MEANS:  # a curve: its _auc column is the cell
                if values.shape[0]:
                    y = _nanmean(values.reshape(-1, values.shape[2]), axis=0)
                    x = road_x(config, values.shape[2]) if metric.startswith("road") else np.linspace(0, 1, values.shape[2])
                    entry.curves[metric] = (x, y)
                continue
            if values.ndim in (2, 3):
                cell = summarize(per_input(values, metric))
                if cell is not None:
                    entry.cells[metric] = cell
    return [e for e in entries.values() if e.cells or e.curves]


def tag_duplicates(entries: List[Entry], runs: Sequence[RunDir]) -> None:
    """Give each method found in several runs the overrides that tell those runs apart (the run's
    name where they do not, or a run has none recorded)."""
    overrides = {r.name: dict(split_override(o) for o in r.overrides or []) for r in runs}
    recorded = {r.name for r in runs if r.overrides is not None}
    groups: Dict[Tuple[str, str, str], List[Entry]] = {}
    for e in entries:
        groups.setdefault((e.technique, e.layer, e.output), []).append(e)
    for group in (g for g in groups.values() if len(g) > 1):
        keys = list(dict.fromkeys(k for e in group for k in overrides[e.run]))
        differ = [k for k in keys if len({overrides[e.run].get(k) for e in group}) > 1]
        tags = [" ".join(f"{k}={overrides[e.run].get(k, '(unset)')}" for k in differ) for e in group]
        unique = bool(differ) and len(set(tags)) == len(group) and all(e.run in recorded for e in group)
        for e, tag in zip(group, tags):
            e.tag = tag if unique else e.run


def mark_best(entries: Sequence[Entry], metrics: Sequence[str]) -> None:
    """Mark, per metric with a known direction, the cells with the best mean (ties: all of them)."""
    for metric in metrics:
        direction = DIRECTIONS.get(metric)
        cells = [e.cells[metric] for e in entries if metric in e.cells]
        if direction is None or not cells:
            continue
        best = (max if direction == "higher" else min)(c.mean for c in cells)
        for c in cells:
            c.best = c.mean == best


def metric_order(names) -> List[str]:
    """The contract's metrics in DIRECTIONS order, then any others alphabetically."""
    known = [m for m in DIRECTIONS if m in names]
    return known + sorted(set(names) - set(known))


def build_board(runs: Sequence[RunDir], metrics: Optional[Sequence[str]] = None) -> Board:
    """The leaderboard of `runs`; `metrics`: only these columns, in this order. Raises
    LeaderboardError when no run has a metric column or a requested metric is not found."""
    from pipeline.report import natural_key

    entries: List[Entry] = []
    problems: List[str] = []
    for run in runs:
        try:
            entries += read_entries(run)
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            problems.append(f"{run.name}: cannot read maps.h5: {err}")
    found = metric_order({m for e in entries for m in e.cells})
    if not found:
        raise LeaderboardError(f"no metric columns in {len(runs)} run(s){'; ' + '; '.join(problems) if problems else ''}: "
                               f"run with evaluate.deletion=true (and/or evaluate.insertion=true, ...) to compute "
                               f"them; evaluate keys: {', '.join(evaluate_keys())}")
    if metrics:
        missing = [m for m in metrics if m not in found]
        if missing:
            raise LeaderboardError(f"--metrics {','.join(missing)}: not in these runs; found {', '.join(found)}")
        found = list(metrics)
    tag_duplicates(entries, runs)
    entries.sort(key=lambda e: (e.technique, natural_key(e.layer), e.output))  # stable: runs in order
    mark_best(entries, found)
    return Board(entries, found, problems)


def evaluate_keys() -> List[str]:
    """The evaluate.<key> switches (the bool fields of EvaluateConfig)."""
    from pipeline.config import EvaluateConfig

    return [f.name for f in dataclasses.fields(EvaluateConfig) if f.type in (bool, "bool")]


def find_run_dirs(dirs: Sequence[str | Path]) -> List[RunDir]:
    """Run dirs at or below each of `dirs`, named by their path relative to it (a run dir: its name)."""
    from pipeline.report import find_runs, read_overrides

    out: List[RunDir] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise LeaderboardError(f"{d} is not a directory")
        found = find_runs(d)
        if not found:
            raise LeaderboardError(f"{d} has no runs: no maps.h5 in it or in any dir below it")
        prefix = d.resolve().name if len(dirs) > 1 else ""
        for run in found:
            rel = run.relative_to(d).as_posix()
            name = run.resolve().name if rel == "." and not prefix else "/".join(p for p in (prefix, rel) if p != ".")
            out.append(RunDir(run, name, read_overrides(run)))
    return out


# -- output -------------------------------------------------------------------------------------
def _num(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def cell_text(cell: Optional[Cell]) -> str:
    """'0.412 ± 0.031 n=7 *' (* best in its column); '' for a method without that metric."""
    if cell is None:
        return ""
    half = "" if math.isnan(cell.ci_low) else f" \u00b1 {_num((cell.ci_high - cell.ci_low) / 2)}"
    return f"{_num(cell.mean)}{half} n={cell.n}{' *' if cell.best else ''}"


def heading(metric: str) -> str:
    direction = DIRECTIONS.get(metric)
    return f"{metric} ({direction} is better)" if direction else metric


def text_table(board: Board) -> str:
    """The table as aligned text, with a legend."""
    rows = [["method", "layer", "output", *map(heading, board.metrics)]]
    rows += [[e.method, e.layer, e.output, *(cell_text(e.cells.get(m)) for m in board.metrics)] for e in board.entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("mean over inputs (each input's mean over its targets, NaN left out) \u00b1 half-width of the "
                 "95% Student t interval; n inputs; * best in its column")
    lines += [f"skipped {p}" for p in board.problems]
    return "\n".join(lines) + "\n"


def csv_rows(board: Board) -> List[Dict[str, object]]:
    """One row per (method, metric) with the CSV_FIELDS."""
    out = []
    for e in board.entries:
        for m in board.metrics:
            c = e.cells.get(m)
            if c is not None:
                out.append({"method": e.method, "layer": e.layer, "output": e.output, "metric": m,
                            "mean": repr(c.mean), "ci_low": repr(c.ci_low), "ci_high": repr(c.ci_high),
                            "n": c.n, "best": int(c.best)})
    return out


def write_csv(board: Board, path: str | Path) -> Path:
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(board))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.leaderboard",
        description="Rank explanation methods by the metrics their runs computed (evaluate.*), with 95%% "
                    "confidence intervals.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run dir(s) or sweep dir(s)")
    parser.add_argument("--csv", help="write the table to this CSV file (one row per method and metric)")
    parser.add_argument("--metrics", help="comma-separated metric names: only these columns, in this order")
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        board = build_board(find_run_dirs(args.dirs), metrics)
    except LeaderboardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.csv:
        print(write_csv(board, args.csv))
        for p in board.problems:
            print(f"skipped {p}", file=sys.stderr)
    else:
        sys.stdout.write(text_table(board))
    return 0


if __name__ == "__main__":
    sys.exit(main())
