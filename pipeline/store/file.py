"""The write side of maps.h5 (`MapsFile`): rows appended batch by batch into chunked, compressed,
resizable datasets, skipped records, and run-level groups written complete-or-absent.

Crash safety: a batch is written to every row dataset, then the attribute `rows` is raised and
the file flushed. On reopening, every row dataset is cut back to `rows`, so a run killed mid-write
loses only the uncommitted batch, which the resumed run computes again (no row lost or duplicated).
Every write first reserves its room on disk (pipeline.io.space), so a full disk raises DiskFull
before HDF5 writes anything and the committed rows stay readable.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

import h5py
import numpy as np

from pipeline.errors import ConfigError
from pipeline.io.space import DiskFull, is_disk_full, release, reserve
from pipeline.store import layout as L
from pipeline.store.checks import check_resumable, open_error
from pipeline.store.h5util import (META_BYTES, STR, append_bytes, chunk_shape, data_bytes, datasets,
                                   decode_strings, fixed_strings, is_row_dataset, read_all, write_fixed)

MapKey = Tuple[str, str, str]  # (technique, layer, output)
DTYPES = ("float32", "float16")


@dataclass
class RowBatch:
    """One batch of rows as the store writes them; `maps` by (technique, layer, output), [N, ...]."""

    ids: List[str]
    sources: List[str]
    frames: List[int]
    targets: np.ndarray  # [N, K] int64
    scores: np.ndarray  # [N, K] float32
    logits: np.ndarray  # [N, K] float32
    maps: Dict[MapKey, np.ndarray] = field(default_factory=dict)
    pngs: Optional[List[str]] = None  # each row's PNG name ("" when not drawn)

    def columns(self) -> Dict[str, np.ndarray]:
        cols = {
            "id": np.array(self.ids, dtype=object), "source": np.array(self.sources, dtype=object),
            "frame": np.array(self.frames, dtype=np.int64),
            "target": self.targets, "score": self.scores, "logit": self.logits,
            "png": np.array(self.pngs if self.pngs is not None else [""] * len(self.ids), dtype=object),
        }
        cols.update({L.map_name(*key): data for key, data in self.maps.items()})
        return cols


class MapsFile:
    """Appends rows to `path`. `run_key` identifies what the rows mean (model, data, techniques,
    layers, target, store options); reopening a file written under another key raises ConfigError
    naming the keys that differ, and a file that is not a pipeline run's (or is damaged) is refused;
    a refused open leaves the file untouched. `attrs`: provenance (pipeline.provenance: model,
    layers, git commit, versions, ...); `config`: the resolved config (YAML); `shard`: i/n or all;
    `dtype`: how floating-point maps are stored."""

    def __init__(self, path: str | Path, run_key: dict, attrs: Optional[Dict[str, str]] = None,
                 dtype: str = "float32", config: Optional[str] = None, shard: Optional[str] = None):
        if dtype not in DTYPES:
            raise ConfigError(f"store.dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
        self.path, self.dtype = Path(path), np.dtype(dtype)
        key = json.dumps(run_key, sort_keys=True)
        if self.path.is_file() and self.path.stat().st_size == 0:
            self.path.unlink()  # created by a run that died before HDF5 wrote a byte: nothing to keep
        if self.path.exists():
            check_resumable(self.path, run_key)
        try:
            self.f = h5py.File(self.path, "a")
        except OSError as err:
            if is_disk_full(err):
                raise DiskFull(self.path) from None
            raise ConfigError(open_error(self.path, err)) from None
        self._fd = self.f.id.get_vfd_handle()
        self.reserve(META_BYTES + sum(len(str(v)) for v in [*(attrs or {}).values(), config, shard]) + len(key))
        self.f.attrs[L.RUN_KEY] = key
        for name, value in (attrs or {}).items():
            self.f.attrs[name] = value
        for name, value in ((L.CONFIG, config), (L.SHARD, shard)):
            if value is not None:
                self.f.attrs[name] = value
        self.rows = int(self.f.attrs.get(L.ROWS, 0))
        self.skipped_rows = int(self.f.attrs.get(L.SKIPPED_ROWS, 0))
        self._truncate()

    def reserve(self, nbytes: int) -> None:
        """Room for the next write: `nbytes` allocated past the end of the file (or DiskFull)."""
        reserve(self._fd, nbytes, self.path)

    def set_attr(self, name: str, value) -> None:
        """One attribute, written with its room reserved, and flushed."""
        self.reserve(META_BYTES + 2 * len(str(value)))
        self.f.attrs[name] = value
        self.f.flush()

    def reader(self):
        """A RunReader over this open file (no second open), e.g. for the plots at the end of a run."""
        from pipeline.store.reader import RunReader

        return RunReader(self.f, self.path, owner=False)

    # -- rows ------------------------------------------------------------------------------------
    def _truncate(self) -> None:
        """Cut every row dataset back to the committed count (drops a half-written batch; a file
        whose counters exceed its datasets never gets here: check_resumable refuses it). A run
        killed while HDF5 rewrote the chunk holding the last committed rows can leave that chunk
        unreadable: the counts then go back to the chunk's start, and the resume computes those
        rows again (none lost, none twice)."""
        self.rows, self.skipped_rows = self._readable(self.rows, False), self._readable(self.skipped_rows, True)
        for ds in (d for d in datasets(self.f).values() if is_row_dataset(d)):
            limit = self.skipped_rows if ds.name.startswith(f"/{L.SKIPPED}/") else self.rows
            if ds.shape[0] != limit:
                ds.resize(limit, axis=0)
        self.f.flush()

    def _readable(self, committed: int, skipped: bool) -> int:
        """The committed count, cut back to the start of any row dataset's last, partly filled
        chunk that cannot be read (torn by a kill mid-write); the attribute is rewritten then."""
        good = committed
        for ds in (d for d in datasets(self.f).values() if is_row_dataset(d)):
            if ds.name.startswith(f"/{L.SKIPPED}/") != skipped or not ds.chunks or committed == 0:
                continue
            start = (committed - 1) // ds.chunks[0] * ds.chunks[0]
            try:
                ds[start:committed]
            except OSError:
                good = min(good, start)
        if good < committed:
            import logging

            logging.getLogger("pipeline").warning(
                "%s: the last run was killed while writing; %s %d..%d were in a damaged chunk and are "
                "computed again", self.path, "skipped records" if skipped else "rows", good, committed - 1)
            self.f.attrs[L.SKIPPED_ROWS if skipped else L.ROWS] = good
        return good

    def done_ids(self) -> Set[str]:
        """Ids already in the file, as rows or as skipped records."""
        ids: Set[str] = set()
        if "id" in self.f:
            ids.update(decode_strings(self.f["id"][: self.rows]))
        if L.skipped_name("id") in self.f:
            ids.update(decode_strings(self.f[L.skipped_name("id")][: self.skipped_rows]))
        return ids

    def as_stored(self, maps: Dict[MapKey, np.ndarray]) -> Dict[MapKey, np.ndarray]:
        """The maps as the file will hold them: floating-point ones in the store's dtype."""
        return {key: self._cast(key, np.asarray(data)) for key, data in maps.items()}

    def _cast(self, key: MapKey, data: np.ndarray) -> np.ndarray:
        if data.dtype.kind != "f" or data.dtype == self.dtype:
            return data
        out = data.astype(self.dtype)
        if np.count_nonzero(~np.isfinite(out)) > np.count_nonzero(~np.isfinite(data)):
            import logging

            logging.getLogger("pipeline").warning(
                "store.dtype=float16: values of %s beyond +-65504 are stored as inf", L.map_name(*key))
        return out

    def reserve_rows(self, batch: RowBatch) -> None:
        """Room for a batch's rows, before anything of it (its PNGs) is written."""
        self.reserve(append_bytes(batch.columns()))

    def append_rows(self, batch: RowBatch) -> int:
        """Append and commit one batch; returns the first new row's index."""
        return self.append(batch.columns())

    def append(self, columns: Dict[str, np.ndarray]) -> int:
        """Append one batch of named columns (every column the same length) and commit it."""
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns of different lengths: {lengths}")
        (n,) = lengths
        self.reserve(append_bytes(columns))
        start = self.rows
        for name, data in columns.items():
            self._append(name, np.asarray(data), start)
        self.rows = start + n
        self.f.attrs[L.ROWS] = self.rows
        self.f.flush()
        return start

    def _append(self, name: str, data: np.ndarray, start: int) -> None:
        if data.dtype.kind in "OUS" and not (name in self.f and self.f[name].dtype == STR):
            # fixed-length bytes (a run made before them keeps its variable-length strings)
            data = fixed_strings(data, L.string_width(name), name, cut=name == L.skipped_name("reason"))
        if name not in self.f:
            if start:
                raise RuntimeError(f"dataset {name} appears after {start} rows were written")
            opts = {"compression": "lzf"} if data.dtype.kind == "S" else {"compression": "lzf", "shuffle": True}
            self.f.create_dataset(
                name, shape=(0,) + data.shape[1:], maxshape=(None,) + data.shape[1:], dtype=data.dtype,
                chunks=chunk_shape(data.shape[1:], data.dtype.itemsize), **opts,
            )
        ds = self.f[name]
        if ds.shape[1:] != data.shape[1:]:
            raise RuntimeError(f"dataset {name}: row shape {data.shape[1:]} != stored {ds.shape[1:]}")
        ds.resize(start + len(data), axis=0)
        ds[start:] = data.astype(object) if ds.dtype == STR else data

    def append_skipped(self, records: Iterable) -> None:
        """Skipped records (pipeline.data.Skip: id, source, frame, reason), committed."""
        records = list(records)
        if not records:
            return
        self.reserve(META_BYTES + 4 * sum(len(r.id) + len(r.source) + len(r.reason) + 8 for r in records))
        for name in L.SKIP_FIELDS:
            values = np.array([getattr(r, name) for r in records], dtype=np.int64 if name == "frame" else object)
            self._append(L.skipped_name(name), values, self.skipped_rows)
        self.skipped_rows += len(records)
        self.f.attrs[L.SKIPPED_ROWS] = self.skipped_rows
        self.f.flush()

    # -- run-level records -------------------------------------------------------------------------
    def attempts(self) -> List[dict]:
        return json.loads(self.f.attrs.get(L.ATTEMPTS, "[]"))

    def record_attempts(self, attempts: List[dict]) -> None:
        self.set_attr(L.ATTEMPTS, json.dumps(attempts))

    def record_merged_from(self, shards: List[dict]) -> None:
        """Which shard runs a merged file was made from ([{dir, shard, rows, skipped_rows}])."""
        self.set_attr(L.MERGED_FROM, json.dumps(shards))

    def write_classes(self, names: List[str]) -> None:
        """The model's class names, once."""
        if L.CLASSES not in self.f:
            data = np.array(names, dtype=object)
            self.reserve(META_BYTES + 2 * data_bytes(data))
            write_fixed(self.f, L.CLASSES, data)

    def has_group(self, group: str) -> bool:
        return group in self.f

    def write_group(self, group: str, arrays: Dict[str, np.ndarray], attrs: Optional[dict] = None) -> None:
        """Fixed-size arrays under `group`, by path below it (and the group's `attrs`); the group is
        renamed into place last, so a run killed mid-write redoes it (and `has_group(group)` stays
        False until then)."""
        arrays = {name: np.asarray(a) for name, a in arrays.items()}
        self.reserve(META_BYTES + 2 * sum(data_bytes(a) for a in arrays.values()))
        for stale in (group, group + L.PARTIAL):
            if stale in self.f:
                del self.f[stale]
        g = self.f.create_group(group + L.PARTIAL)
        for name, data in arrays.items():
            write_fixed(g, name, data)
        for name, value in (attrs or {}).items():
            g.attrs[name] = value
        self.f.flush()
        self.f.move(group + L.PARTIAL, group)
        self.f.flush()

    def group_arrays(self, group: str) -> Dict[Tuple[str, str], np.ndarray]:
        """{(layer, output): array} of a group written as `<group>/<layer>/<output>`."""
        out: Dict[Tuple[str, str], np.ndarray] = {}
        for name, ds in datasets(self.f[group]).items():
            layer, _, output = name.rpartition("/")
            out[layer, output] = read_all(ds)
        return out

    # data-free techniques' results, the receptive-field table, run-level summaries
    def has_generated(self, technique: str) -> bool:
        return self.has_group(technique)

    def write_generated(self, technique: str, arrays: Dict[Tuple[str, str], np.ndarray]) -> None:
        self.write_group(technique, {f"{layer}/{output}": a for (layer, output), a in arrays.items()})

    def generated(self, technique: str) -> Dict[Tuple[str, str], np.ndarray]:
        return self.group_arrays(technique)

    def has_field_table(self) -> bool:
        return self.has_group(L.FIELD_TABLE)

    def write_field_table(self, arrays: Dict[str, np.ndarray]) -> None:
        self.write_group(L.FIELD_TABLE, arrays)

    def write_summary(self, technique: str, final: Dict[Tuple[str, str], np.ndarray], stats: Dict[str, np.ndarray],
                      facts: Dict[Tuple[str, str], np.ndarray], rows: int) -> None:
        """summary/<technique>: its arrays (final, then the model-derived facts), the statistics
        they were finalized from (covering `rows` committed rows) and the facts on their own."""
        arrays = {f"{layer}/{output}": a for (layer, output), a in {**final, **facts}.items()}
        arrays.update({f"{L.STATS}/{name}": a for name, a in stats.items()})
        arrays.update({f"{L.FACTS}/{layer}/{output}": a for (layer, output), a in facts.items()})
        self.write_group(L.summary_group(technique), arrays, {L.SUMMARY_ROWS: rows})

    def copy_fixed(self, reader, names: Iterable[str]) -> None:
        """Copy fixed datasets from another run (a RunReader) as they are stored (dtype, chunks)."""
        src = reader._file
        for name in names:
            parent, _, base = name.rpartition("/")
            src.copy(src[name], self.f.require_group(parent) if parent else self.f, name=base)

    def close(self) -> None:
        """Flush and close; then the room reserved past the end of the file and not used is freed."""
        if self.f.id.valid:
            self.f.flush()
            self.f.close()
            release(self.path)
