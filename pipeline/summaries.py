"""Run-level summaries that merge by construction.

A technique with `has_summary = True` turns rows into sufficient statistics with
`partial(rows, ids)`, combines two of them with `combine(a, b)` (associative and commutative:
shards, resumes and batches all combine the same way) and turns the result into its summary
arrays with `finalize(stats)`; values that come from the model rather than from rows (an ERF's
theoretical box) are its `facts()`. Statistics are a flat {name: array} dict ("<layer>/sum").

The building blocks below cover the usual statistics: sums and counts (`add`), a running top-k
by score keeping ids, per row of a [C, R] array (`keep`, `select`) or for one row (`top_k`,
`merge_top_k`), and histograms over fixed bins (`add` of counts).
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


def keep(scores: np.ndarray, ids: np.ndarray, k: int, largest: bool = True,
         extra: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """Per row c of scores [C, R] (ids [C, R], extra arrays [C, R, ...]): the k largest (or smallest)
    entries, ordered by score then id, so the result does not depend on the order rows came in.
    Returns {"score": [C, k'], "id": [C, k'], **extra: [C, k', ...]}, k' = min(k, R)."""
    scores = np.asarray(scores, dtype=np.float64)
    ids = np.asarray(ids, dtype=object)
    rank = _id_ranks(ids)
    key = np.where(np.isnan(scores), -np.inf if largest else np.inf, scores)
    order = np.lexsort((rank, -key if largest else key), axis=-1)[:, :k]  # [C, k']
    out = {"score": np.take_along_axis(scores, order, 1), "id": np.take_along_axis(ids, order, 1)}
    for name, values in (extra or {}).items():
        index = order.reshape(order.shape + (1,) * (values.ndim - 2))
        out[name] = np.take_along_axis(np.asarray(values), index, 1)
    return out


def _id_ranks(ids: np.ndarray) -> np.ndarray:
    """Each id's rank among the distinct ids of `ids` (as strings), same shape, int64. A dict over
    the distinct ids (a running top-k holds few of them; sorting every string cost more than the
    rest of an update); ids broadcast along the rows (a batch's, the same for every channel) are
    ranked once."""
    if ids.ndim == 2 and ids.shape[0] > 1 and ids.strides[0] == 0:
        return np.broadcast_to(_id_ranks(ids[:1]), ids.shape)
    flat = list(map(str, ids.ravel().tolist()))
    index = {name: i for i, name in enumerate(sorted(set(flat)))}
    return np.fromiter(map(index.__getitem__, flat), np.int64, len(flat)).reshape(ids.shape)


def select(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray], prefix: str, k: int, largest: bool = True
           ) -> Dict[str, np.ndarray]:
    """Two running top-k statistics (`<prefix>score`, `<prefix>id`, other `<prefix>*` rows, each
    row ordered as `keep` leaves it) as one. When one side holds k per row, only the rows where
    the other's best displaces its worst are merged (`keep`); the others are that side's rows as
    they are, which after the first batches of a run is almost every row."""
    names = [n[len(prefix):] for n in a if n.startswith(prefix) and n[len(prefix):] not in ("score", "id")]
    fields = ["score", "id", *names]

    def merged(rows) -> Dict[str, np.ndarray]:
        both = {name: np.concatenate([a[prefix + name][rows], b[prefix + name][rows]], 1) for name in fields}
        return keep(both["score"], both["id"], k, largest, {name: both[name] for name in names})

    full, other = (a, b) if a[prefix + "score"].shape[1] >= b[prefix + "score"].shape[1] else (b, a)
    if full[prefix + "score"].shape[1] != k:  # neither side holds k yet: every row changes width
        return merged(slice(None))
    rows = _rows_to_merge(np.asarray(full[prefix + "score"], np.float64), full[prefix + "id"],
                          np.asarray(other[prefix + "score"], np.float64), other[prefix + "id"], k, largest)
    out = {name: np.array(full[prefix + name], dtype=np.float64 if name == "score" else None, copy=True)
           for name in fields}
    if rows.any():
        for name, values in merged(rows).items():
            out[name][rows] = values
    return out


def _rows_to_merge(full: np.ndarray, full_ids: np.ndarray, other: np.ndarray, other_ids: np.ndarray, k: int,
                   largest: bool) -> np.ndarray:
    """[C] bool: the rows where `other`'s best entry (other [C, ko], best first by score then id)
    would enter `full`'s kept k (full [C, k], ordered alike): it scores better than full's worst,
    or the same with a smaller id. Rows whose scores all tie (a dead channel's zeros, duplicated
    inputs) are therefore merged only when an id would change. NaN scores rank last, as in keep."""
    if other.shape[1] == 0:
        return np.zeros(full.shape[0], bool)
    fill = -np.inf if largest else np.inf
    worst = np.where(np.isnan(full[:, k - 1]), fill, full[:, k - 1])
    best = np.where(np.isnan(other[:, 0]), fill, other[:, 0])
    rows = best > worst if largest else best < worst
    for c in np.flatnonzero(best == worst):
        rows[c] = str(other_ids[c, 0]) < str(full_ids[c, k - 1])
    return rows


def top_k(scores: np.ndarray, ids: Sequence[str], k: int, extra: Optional[Dict[str, np.ndarray]] = None
          ) -> Tuple[np.ndarray, np.ndarray, Dict[str, np.ndarray]]:
    """`keep` for one row: the k highest `scores` [n] with their `ids` and rows of `extra` arrays
    [n, ...], ties broken by id: (scores [<=k], ids [<=k], extra)."""
    kept = keep(np.asarray(scores, dtype=np.float64)[None], np.asarray(list(ids), dtype=object)[None], k,
                extra={name: np.asarray(v)[None] for name, v in (extra or {}).items()})
    return kept.pop("score")[0], kept.pop("id")[0], {name: v[0] for name, v in kept.items()}


def merge_top_k(a: Stats, b: Stats, k: int, prefix: str) -> Stats:
    """Two running top-k statistics `<prefix>score`, `<prefix>id` (and other `<prefix>*` rows) as one."""
    out = select({n: v[None] for n, v in a.items() if n.startswith(prefix)},
                 {n: v[None] for n, v in b.items() if n.startswith(prefix)}, prefix, k)
    return {prefix + name: v[0] for name, v in out.items()}


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
