"""Run-level summaries that merge by construction.

A technique with `has_summary = True` turns rows into sufficient statistics with
`partial(rows, ids)`, combines two of them with `combine(a, b)` (associative and commutative:
shards, resumes and batches all combine the same way) and turns the result into its summary
arrays with `finalize(stats)`; values that come from the model rather than from rows (an ERF's
theoretical box) are its `facts()`. Statistics are a flat {name: array} dict ("<layer>/sum").

The building blocks below cover the usual statistics: sums and counts (`add`), a running top-k
by score keeping ids (`top_k`), and histograms over fixed bins (`add` of counts).
`Summaries` drives them for a run: it resumes the statistics from the file, updates them with
every committed batch and writes summary/<technique> at the end; `stats_of_run` is what a merge
combines.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from pipeline.store.layout import is_metric

Stats = Dict[str, np.ndarray]
RECOMPUTE_ROWS = 256  # rows per partial() when statistics are recomputed from the file


def add(a: Stats, b: Stats) -> Stats:
    """Key-wise sum of two statistics with the same keys (sums, counts, histogram counts)."""
    if set(a) != set(b):
        raise ValueError(f"statistics with different keys: {sorted(set(a) ^ set(b))}")
    return {k: np.asarray(a[k]) + np.asarray(b[k]) for k in a}


def top_k(scores: np.ndarray, ids: Sequence[str], k: int, extra: Optional[Dict[str, np.ndarray]] = None
          ) -> Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray]]:
    """The k highest `scores` [n] with their `ids` and rows of `extra` arrays [n, ...], ties broken
    by id (so the result does not depend on the order rows arrive in): (scores [<=k], ids [<=k], extra)."""
    scores = np.asarray(scores, dtype=np.float64)
    ids = np.asarray(list(ids), dtype=object)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], str(ids[i])))[:k]
    return scores[order], ids[order], {name: np.asarray(v)[order] for name, v in (extra or {}).items()}


def merge_top_k(a: Stats, b: Stats, k: int, prefix: str) -> Stats:
    """Two running top-k statistics `<prefix>score`, `<prefix>id` (and other `<prefix>*` rows) as one."""
    names = [n for n in a if n.startswith(prefix) and n not in (prefix + "score", prefix + "id")]
    scores, ids, extra = top_k(np.concatenate([a[prefix + "score"], b[prefix + "score"]]),
                               list(a[prefix + "id"]) + list(b[prefix + "id"]), k,
                               {n: np.concatenate([a[n], b[n]]) for n in names})
    return {prefix + "score": scores, prefix + "id": ids, **extra}


def combine_all(technique, parts: Iterable[Optional[Stats]]) -> Optional[Stats]:
    """combine() over `parts` (None parts are left out); None when there is none."""
    out: Optional[Stats] = None
    for part in parts:
        if part is not None:
            out = part if out is None else technique.combine(out, part)
    return out


def stats_of_rows(technique, name: str, reader) -> Optional[Stats]:
    """Statistics recomputed from a run's committed rows of technique `name` (RECOMPUTE_ROWS at a time)."""
    maps = reader.maps(name)
    if not maps or reader.rows == 0:
        return None
    ids = reader.ids()
    blocks = (technique.partial({key: col[s: s + RECOMPUTE_ROWS] for key, col in maps.items()}, ids[s: s + RECOMPUTE_ROWS])
              for s in range(0, reader.rows, RECOMPUTE_ROWS))
    return combine_all(technique, blocks)


def stats_of_run(technique, name: str, reader) -> Optional[Stats]:
    """A run's statistics: as stored when they cover every committed row, else recomputed."""
    stats, rows = reader.summary_stats(name)
    if stats is not None and rows == reader.rows:
        return stats
    return stats_of_rows(technique, name, reader)


class Summaries:
    """The run-level summaries of a run's techniques, kept up to date batch by batch."""

    def __init__(self, techniques: Dict[str, object]):
        self.techniques = {name: t for name, t in techniques.items() if getattr(t, "has_summary", False)}
        self.stats: Dict[str, Optional[Stats]] = {name: None for name in self.techniques}

    def __bool__(self) -> bool:
        return bool(self.techniques)

    def resume(self, reader) -> None:
        """Start from the rows already in the file (a resumed run)."""
        for name, t in self.techniques.items():
            self.stats[name] = stats_of_run(t, name, reader)

    def update(self, maps: Dict[Tuple[str, str, str], np.ndarray], ids: List[str]) -> None:
        """Add one committed batch: maps by (technique, layer, output), as stored."""
        for name, t in self.techniques.items():
            rows = {(layer, output): m for (tech, layer, output), m in maps.items()
                    if tech == name and not is_metric(output)}
            if rows:
                part = t.partial(rows, ids)
                self.stats[name] = part if self.stats[name] is None else t.combine(self.stats[name], part)

    def write(self, maps_file, fetch=None) -> Dict[str, Dict[Tuple[str, str], np.ndarray]]:
        """summary/<technique> for every technique with statistics (completed from the inputs
        `fetch` decodes again, see Technique.complete); returns the summaries written."""
        written = {}
        for name, t in self.techniques.items():
            stats = self.stats[name]
            if stats is None:
                continue
            final, facts = t.finalize(stats), t.facts()
            final.update(t.complete(final, facts, fetch))
            maps_file.write_summary(name, final, stats, facts, maps_file.rows)
            written[name] = {**final, **facts}
        return written
