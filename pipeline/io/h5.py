"""maps.h5: one row per input, appended batch by batch into chunked, compressed, resizable datasets.

Crash safety: a batch is written to every row dataset, then the attribute `rows` is raised and
the file flushed. On reopening, every row dataset is cut back to `rows`, so a run killed mid-write
loses only the uncommitted batch, which the resumed run computes again (no row lost or duplicated).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set

import h5py
import numpy as np

from pipeline.config import ConfigError

STR = h5py.string_dtype()
SKIP_FIELDS = ("id", "source", "frame", "reason")
CHUNK_BYTES = 1 << 16  # small rows are grouped up to this size; a larger map is one chunk per row


def decode_strings(values) -> List[str]:
    """Strings read back from an h5py string dataset (bytes or str) as a list of str."""
    return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in values]


def datasets(group: h5py.Group) -> Dict[str, h5py.Dataset]:
    """Every dataset below `group`, by its path relative to it."""
    found: Dict[str, h5py.Dataset] = {}
    group.visititems(lambda name, obj: found.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def _chunks(row_shape: Sequence[int], itemsize: int) -> tuple:
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * itemsize
    return (max(1, CHUNK_BYTES // max(row_bytes, 1)),) + tuple(row_shape)


class MapsFile:
    """Appends rows to `path`. `run_key` identifies what the rows mean (model, data, techniques,
    layers, target); reopening a file written under another key raises ConfigError."""

    def __init__(self, path: str | Path, run_key: dict, attrs: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        key = json.dumps(run_key, sort_keys=True)
        try:
            self.f = h5py.File(self.path, "a")
        except OSError as err:
            raise ConfigError(
                f"{self.path} exists but cannot be opened ({err}); move it away to start this run over"
            ) from None
        if "run_key" in self.f.attrs and self.f.attrs["run_key"] != key:
            self.f.close()
            raise ConfigError(
                f"{self.path} was written by a run with a different model/data/technique/layers/target "
                "config; use a new run dir (hydra.run.dir=...) or restore the old settings to resume"
            )
        self.f.attrs["run_key"] = key
        for name, value in (attrs or {}).items():
            self.f.attrs[name] = value
        self.rows = int(self.f.attrs.get("rows", 0))
        self.skipped_rows = int(self.f.attrs.get("skipped_rows", 0))
        self._truncate()

    # -- reading back -------------------------------------------------------------------------
    def _row_datasets(self) -> List[h5py.Dataset]:
        return [d for d in datasets(self.f).values() if d.maxshape and d.maxshape[0] is None]

    def _truncate(self) -> None:
        """Cut every row dataset back to the committed count (drops a half-written batch)."""
        for ds in self._row_datasets():
            limit = self.skipped_rows if ds.name.startswith("/skipped/") else self.rows
            if ds.shape[0] != limit:
                ds.resize(limit, axis=0)
        self.f.flush()

    def done_ids(self) -> Set[str]:
        """Ids already in the file, as rows or as skipped records."""
        ids: Set[str] = set()
        if "id" in self.f:
            ids.update(decode_strings(self.f["id"][: self.rows]))
        if "skipped/id" in self.f:
            ids.update(decode_strings(self.f["skipped/id"][: self.skipped_rows]))
        return ids

    # -- writing ------------------------------------------------------------------------------
    def _append(self, name: str, data: np.ndarray, start: int) -> None:
        if name not in self.f:
            if start:
                raise RuntimeError(f"dataset {name} appears after {start} rows were written")
            dtype = STR if data.dtype.kind in "OUS" else data.dtype
            opts = {} if dtype is STR else {"compression": "lzf", "shuffle": True}
            self.f.create_dataset(
                name, shape=(0,) + data.shape[1:], maxshape=(None,) + data.shape[1:], dtype=dtype,
                chunks=_chunks(data.shape[1:], 8 if dtype is STR else data.dtype.itemsize), **opts,
            )
        ds = self.f[name]
        if ds.shape[1:] != data.shape[1:]:
            raise RuntimeError(f"dataset {name}: row shape {data.shape[1:]} != stored {ds.shape[1:]}")
        ds.resize(start + len(data), axis=0)
        ds[start:] = data.astype(object) if ds.dtype == STR else data

    def append(self, columns: Dict[str, np.ndarray]) -> int:
        """Append one batch (every column the same length); returns the first new row's index."""
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns of different lengths: {lengths}")
        (n,) = lengths
        start = self.rows
        for name, data in columns.items():
            self._append(name, np.asarray(data), start)
        self.rows = start + n
        self.f.attrs["rows"] = self.rows
        self.f.flush()
        return start

    def append_skipped(self, records: Iterable) -> None:
        records = list(records)
        if not records:
            return
        for field in SKIP_FIELDS:
            values = np.array([getattr(r, field) for r in records], dtype=np.int64 if field == "frame" else object)
            self._append(f"skipped/{field}", values, self.skipped_rows)
        self.skipped_rows += len(records)
        self.f.attrs["skipped_rows"] = self.skipped_rows
        self.f.flush()

    def technique_rows(self, technique: str) -> Dict[tuple, h5py.Dataset]:
        """{(layer, output): row dataset [rows, ...]} of one technique."""
        out: Dict[tuple, h5py.Dataset] = {}
        group = self.f.get(technique)
        if isinstance(group, h5py.Group):
            for layer, sub in group.items():
                if isinstance(sub, h5py.Group):
                    for output, ds in sub.items():
                        if isinstance(ds, h5py.Dataset):
                            out[layer, output] = ds
        return out

    def has(self, name: str) -> bool:
        return name in self.f

    def write_group(self, group: str, arrays: Dict[str, np.ndarray]) -> None:
        """Fixed-size results of a data-free technique under `group`; the group is marked complete
        last, so a run killed mid-write redoes it (and `has(group)` stays False until then)."""
        for stale in (group, group + ".partial"):
            if stale in self.f:
                del self.f[stale]
        g = self.f.create_group(group + ".partial")
        for name, data in arrays.items():
            if data.dtype.kind in "OUS":
                g.create_dataset(name, data=data.astype(object), dtype=STR)
            else:
                g.create_dataset(name, data=data, compression="lzf" if data.size > 1024 else None)
        self.f.flush()
        self.f.move(group + ".partial", group)
        self.f.flush()

    def write_once(self, name: str, data: np.ndarray) -> None:
        """A dataset that does not grow with rows (e.g. class names)."""
        if name not in self.f:
            self.f.create_dataset(name, data=data.astype(object) if data.dtype.kind in "OUS" else data,
                                  dtype=STR if data.dtype.kind in "OUS" else data.dtype)

    def close(self) -> None:
        if self.f.id.valid:
            self.f.flush()
            self.f.close()
