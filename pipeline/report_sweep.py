"""The report's sweep part: one row per run, one column per swept key, anchors, Hydra's record."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, List, Sequence, Tuple

import yaml

from pipeline.report_html import Raw, esc, fmt, table

if TYPE_CHECKING:
    from pipeline.report import Run


def split_override(text: str) -> Tuple[str, str]:
    """`+key=value` -> (key, value); `~key` -> (key, '(deleted)')."""
    left, sep, right = text.partition("=")
    key = left.lstrip("+~")
    if left.startswith("~"):
        return key, "(deleted)" + (f" {right}" if sep else "")
    return key, right


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


def _sweep_overrides(root: Path) -> List[str]:
    """The sweep's command-line overrides, from Hydra's multirun.yaml."""
    try:
        data = yaml.safe_load((root / "multirun.yaml").read_text())
        task = data["hydra"]["overrides"]["task"]
        return [str(t) for t in task] if isinstance(task, list) else []
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return []
