"""The report's Leaderboard section (pipeline.leaderboard's table as HTML) and its inline SVG charts:
per metric the means with their 95% intervals as horizontal bars, and the mean deletion /
insertion / ROAD curves per method."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np

from pipeline.leaderboard import CURVES, Board, Cell, LeaderboardError, RunDir, build_board, heading
from pipeline.report_html import Raw, esc, fmt

if TYPE_CHECKING:
    from pipeline.report import Run

LEADERBOARD_CSS = """
td.best { font-weight: 700; background: #e6f4ea; }
.lb-charts { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.lb-chart text { font: 12px system-ui, sans-serif; fill: #1d1d1f; }
.lb-chart .axis { stroke: #888; } .lb-chart .grid { stroke: #eee; }
.lb-chart .bar { fill: #8fb3d9; } .lb-chart .bar.best { fill: #2e7d32; }
.lb-chart .ci { stroke: #1d1d1f; stroke-width: 1.5; } .lb-chart .line { fill: none; stroke-width: 2; }
"""
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
CURVE_AXES = {"deletion": "fraction of pixels deleted", "insertion": "fraction of pixels inserted",
              "road_morf": "fraction removed, most relevant first (ROAD)",
              "road_lerf": "fraction removed, least relevant first (ROAD)"}


def board_of(runs: Sequence[Run]) -> Optional[Board]:
    """The leaderboard of the report's readable runs; None when none has a metric column."""
    dirs = [RunDir(r.path, r.name, r.overrides) for r in runs if not r.error]
    try:
        return build_board(dirs) if dirs else None
    except LeaderboardError:
        return None


def cell_html(cell: Optional[Cell]) -> Tuple[str, bool]:
    """('0.412 ± 0.031 <small>n=7</small>', best) for a table cell."""
    if cell is None:
        return "", False
    half = "" if math.isnan(cell.ci_low) else f" \u00b1 {fmt((cell.ci_high - cell.ci_low) / 2)}"
    return f'{esc(fmt(cell.mean))}{esc(half)} <span class="muted">n={cell.n}</span>', cell.best


def board_table(board: Board) -> str:
    """The table: one row per method, a column per metric, the best per column in bold."""
    head = "".join(f"<th>{esc(h)}</th>" for h in ["method", "layer", "output", *map(heading, board.metrics)])
    rows = []
    for e in board.entries:
        cells = [f"<td>{esc(v)}</td>" for v in (e.method, e.layer, e.output)]
        for m in board.metrics:
            text, best = cell_html(e.cells.get(m))
            title = ""
            if e.cells.get(m) is not None and not math.isnan(e.cells[m].ci_low):
                title = f' title="95% interval [{esc(fmt(e.cells[m].ci_low))}, {esc(fmt(e.cells[m].ci_high))}]"'
            cells.append(f'<td class="num{" best" if best else ""}"{title}>{text}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table class="leaderboard"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _ticks(lo: float, hi: float, count: int = 5) -> List[float]:
    """Round tick values covering [lo, hi]."""
    span = hi - lo if hi > lo else 1.0
    step = 10 ** math.floor(math.log10(span / count))
    for factor in (1, 2, 5, 10):
        if span / (step * factor) <= count:
            step *= factor
            break
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def bar_chart(board: Board, metric: str, width: int = 560) -> str:
    """Horizontal bars of the means of `metric` from 0, whiskers over the 95% intervals, best in green."""
    items = [(e.label, e.cells[metric]) for e in board.entries if metric in e.cells]
    if not items:
        return ""
    ends = [0.0] + [v for _, c in items for v in (c.mean, c.ci_low, c.ci_high) if math.isfinite(v)]
    lo, hi = min(ends), max(ends)
    if hi == lo:
        hi = lo + 1.0
    label_w, row_h, top, bottom = 230, 22, 22, 30
    plot_w = width - label_w - 20
    height = top + row_h * len(items) + bottom

    def x(v: float) -> float:
        return label_w + plot_w * (v - lo) / (hi - lo)

    out = [f'<svg class="lb-chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="{esc(metric)}: mean and 95% interval per method">',
           f'<text x="{label_w}" y="14">{esc(heading(metric))}</text>']
    for t in _ticks(lo, hi):
        out.append(f'<line class="grid" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top}" y2="{height - bottom}"/>'
                   f'<text x="{x(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{esc(fmt(t))}</text>')
    for i, (label, c) in enumerate(items):
        y = top + i * row_h
        left, right = sorted((x(0.0), x(c.mean)))
        out.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{esc(label)}</text>'
                   f'<rect class="bar{" best" if c.best else ""}" x="{left:.1f}" y="{y + 4}" '
                   f'width="{max(right - left, 0.5):.1f}" height="{row_h - 8}"><title>{esc(label)}: '
                   f'{esc(fmt(c.mean))} (n={c.n})</title></rect>')
        if math.isfinite(c.ci_low):
            mid = y + row_h / 2
            out.append(f'<path class="ci" d="M{x(c.ci_low):.1f} {mid}H{x(c.ci_high):.1f}M{x(c.ci_low):.1f} '
                       f'{mid - 5}V{mid + 5}M{x(c.ci_high):.1f} {mid - 5}V{mid + 5}"/>')
    out.append(f'<line class="axis" x1="{x(0.0):.1f}" x2="{x(0.0):.1f}" y1="{top}" y2="{height - bottom}"/></svg>')
    return "".join(out)


def curve_chart(board: Board, curve: str, width: int = 560, height: int = 300) -> str:
    """The mean `curve` of each method that has it, one coloured line each, with a legend."""
    lines = [(i, e.label, *e.curves[curve]) for i, e in enumerate(board.entries) if curve in e.curves]
    lines = [(i, label, x, y) for i, label, x, y in lines if np.isfinite(y).any()]  # a method keeps its colour
    if not lines:
        return ""
    ys = np.concatenate([y[np.isfinite(y)] for *_, y in lines])
    lo, hi = min(0.0, float(ys.min())), float(ys.max())
    if hi <= lo:
        hi = lo + 1.0
    left, right, top, bottom = 48, 12, 24, 40
    legend_h = 18 * len(lines)
    total_h = height + legend_h

    def px(v: float) -> float:
        return left + (width - left - right) * float(v)

    def py(v: float) -> float:
        return top + (height - top - bottom) * (1 - (float(v) - lo) / (hi - lo))

    out = [f'<svg class="lb-chart" viewBox="0 0 {width} {total_h}" width="{width}" height="{total_h}" role="img" '
           f'aria-label="mean {esc(curve)} curve per method">', f'<text x="{left}" y="14">mean {esc(curve)} curve</text>']
    for t in _ticks(lo, hi):
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{py(t):.1f}" y2="{py(t):.1f}"/>'
                   f'<text x="{left - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{esc(fmt(t))}</text>')
    for t in _ticks(0.0, 1.0):
        out.append(f'<text x="{px(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{esc(fmt(t))}</text>')
    out.append(f'<text x="{px(0.5):.1f}" y="{height - 6}" text-anchor="middle">{esc(CURVE_AXES.get(curve, ""))}</text>')
    out.append(f'<path class="axis" fill="none" d="M{left} {top}V{height - bottom}H{width - right}"/>')
    for row, (i, label, x, y) in enumerate(lines):
        color = PALETTE[i % len(PALETTE)]
        keep = np.isfinite(y)
        points = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(np.asarray(x)[keep], y[keep]))
        out.append(f'<polyline class="line" stroke="{color}" points="{points}"><title>{esc(label)}</title></polyline>')
        ly = height + 18 * row + 12
        out.append(f'<line x1="{left}" x2="{left + 24}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" stroke-width="3"/>'
                   f'<text x="{left + 30}" y="{ly}">{esc(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def leaderboard_section(runs: Sequence[Run]) -> str:
    """The section (heading, note, table, bar charts, curve charts); '' when no run has metrics."""
    board = board_of(runs)
    if board is None:
        return ""
    note = ('<p class="muted">Per method: the mean over inputs of each input\'s mean over its targets (NaN '
            "left out) \u00b1 the half-width of its 95% Student t interval (hover a cell for [low, high]), n "
            "inputs; the best per column in bold (none where the metric's direction is unknown). Also as CSV: "
            "<code>python -m pipeline.leaderboard DIR --csv board.csv</code>.</p>")
    problems = "".join(f'<p class="error">{esc(p)}</p>' for p in board.problems)
    bars = "".join(f'<div>{bar_chart(board, m)}</div>' for m in board.metrics)
    curves = "".join(f'<div>{curve_chart(board, c)}</div>' for c in CURVES
                     if any(c in e.curves for e in board.entries))
    out = ['<section id="leaderboard">', "<h2>Leaderboard</h2>", note, problems, board_table(board),
           f'<h3>Means and 95% intervals</h3><div class="lb-charts">{bars}</div>']
    if curves:
        out.append(f'<h3>Mean curves</h3><div class="lb-charts">{curves}</div>')
    out.append("</section>")
    return Raw("\n".join(out))

