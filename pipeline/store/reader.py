"""The read side of maps.h5: `open_run(dir)` -> RunReader, for merge, report, plots, reproduce and
run-level summaries. Files are opened read-only without HDF5 file locking, so a run can be read
while it is being written; only committed rows are seen. Map data comes back as numpy arrays,
float16 maps as float32, strings as str; large datasets are read a block of rows at a time.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import h5py
import numpy as np

from pipeline.store import layout as L
from pipeline.store.h5util import datasets, is_row_dataset, is_str, read, read_all

MAPS = "maps.h5"
BLOCK_BYTES = 32 << 20  # rows read at a time by Column.blocks: about this many bytes


class Column:
    """One dataset: for a row dataset, its committed rows only. Indexing returns numpy arrays."""

    def __init__(self, ds: h5py.Dataset, rows: Optional[int]):
        self._ds, self.name = ds, ds.name.lstrip("/")
        self.is_rows = rows is not None
        n = min(rows, ds.shape[0]) if rows is not None else (ds.shape[0] if ds.shape else 0)
        self.shape: Tuple[int, ...] = (n,) + tuple(ds.shape[1:]) if ds.shape else ()
        self.stored_dtype = "str" if is_str(ds) else str(ds.dtype)
        self.is_str = is_str(ds)
        self.chunk_rows = ds.chunks[0] if ds.chunks else 1
        self.attrs = {k: _value(v) for k, v in ds.attrs.items()}

    @property
    def dtype(self) -> np.dtype:
        """The dtype of what indexing returns (float16 is read as float32, strings as object)."""
        if self.is_str:
            return np.dtype(object)
        return np.dtype(np.float32) if self._ds.dtype == np.float16 else self._ds.dtype

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return self._cast(read(self._ds, start, stop))[::step]
        if isinstance(index, (int, np.integer)):
            if not -len(self) <= index < len(self):
                raise IndexError(f"row {index} of {self.name}, which has {len(self)}")
            return self[int(index) % len(self): int(index) % len(self) + 1][0]
        return self[:][index]

    def stored(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop in the dtype they are stored in (float16 stays float16), strings decoded."""
        return read(self._ds, start, min(stop, len(self)))

    def read(self) -> np.ndarray:
        """The whole dataset (its committed rows)."""
        return self._cast(read_all(self._ds)) if not self.is_rows else self[:]

    def blocks(self, block_bytes: int = BLOCK_BYTES) -> Iterator[Tuple[int, np.ndarray]]:
        """(start, rows) in blocks of about `block_bytes`, whole HDF5 chunks per block."""
        row_bytes = max(1, int(np.prod(self.shape[1:], dtype=np.int64)) * (8 if self.is_str else self._ds.dtype.itemsize))
        step = max(1, block_bytes // row_bytes)
        if step > self.chunk_rows:  # whole HDF5 chunks per block: each chunk is decompressed once
            step -= step % self.chunk_rows
        for start in range(0, len(self), step):
            yield start, self[start: start + step]

    def same_layout(self, other: "Column") -> bool:
        return self.shape[1:] == other.shape[1:] and self.stored_dtype == other.stored_dtype

    def equals(self, other: "Column") -> bool:
        """Same shape, stored dtype and values (NaNs equal)."""
        if self.shape != other.shape or self.stored_dtype != other.stored_dtype:
            return False
        x, y = self.read(), other.read()
        if self.is_str:
            return np.asarray(x, dtype=object).tolist() == np.asarray(y, dtype=object).tolist()
        return bool(np.array_equal(x, y, equal_nan=np.asarray(x).dtype.kind in "fc"))

    @staticmethod
    def _cast(data):
        return data.astype(np.float32) if isinstance(data, np.ndarray) and data.dtype == np.float16 else data


def _value(v):
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


class RunReader:
    """A run's maps.h5, read-only. Use `open_run(dir)`; close it (or use `with`)."""

    def __init__(self, f: h5py.File, path: Path, owner: bool = True):
        self._file, self.path, self._owner = f, Path(path), owner
        self.attrs: Dict[str, object] = {k: _value(v) for k, v in f.attrs.items()}
        self.rows = int(self.attrs.get(L.ROWS) or 0)
        self.skipped_rows = int(self.attrs.get(L.SKIPPED_ROWS) or 0)

    def __enter__(self) -> "RunReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._owner and self._file.id.valid:
            self._file.close()

    # -- what the run is ---------------------------------------------------------------------------
    @property
    def is_pipeline_run(self) -> bool:
        return L.RUN_KEY in self.attrs

    @property
    def run_key(self) -> dict:
        """What the rows mean; raises ValueError when missing or not JSON."""
        text = self.attrs.get(L.RUN_KEY)
        if text is None:
            raise ValueError("no run_key attribute")
        return json.loads(text)

    @property
    def config(self) -> Optional[str]:
        """The resolved config (YAML) the run was made with."""
        return self.attrs.get(L.CONFIG)

    @property
    def shard(self) -> str:
        return str((self.run_key.get("data") or {}).get("shard", self.attrs.get(L.SHARD, "all")))

    def provenance(self) -> Dict[str, object]:
        """The attributes that record how the run was made (model, layers, git commit, versions,
        device, seed, host, command, ...): every attribute that is not the store's own."""
        return {k: v for k, v in self.attrs.items() if k not in L.STORE_ATTRS}

    @property
    def merged_from(self) -> List[dict]:
        """For a merged file: the shard runs it was made from; [] otherwise."""
        try:
            return json.loads(self.attrs.get(L.MERGED_FROM) or "[]")
        except (TypeError, ValueError):
            return []

    def attempts(self) -> List[dict]:
        try:
            found = json.loads(self.attrs.get(L.ATTEMPTS) or "[]")
        except (TypeError, ValueError):
            return []
        return [a for a in found if isinstance(a, dict)] if isinstance(found, list) else []

    def half_written(self) -> List[str]:
        """Groups a killed run left half-written (`.partial`)."""
        found: List[str] = []
        self._file.visit(lambda name: found.append(name) if name.endswith(L.PARTIAL) else None)
        return found

    # -- rows --------------------------------------------------------------------------------------
    def column(self, name: str) -> Optional[Column]:
        """A row column (id, source, frame, target, score, logit, png) or any dataset by name."""
        ds = self._file.get(name)
        if not isinstance(ds, h5py.Dataset):
            return None
        if not is_row_dataset(ds):
            return Column(ds, None)
        return Column(ds, self.skipped_rows if name.startswith(f"{L.SKIPPED}/") else self.rows)

    def ids(self) -> List[str]:
        col = self.column("id")
        return list(col[:]) if col is not None else []

    def skipped(self) -> list:
        """[Skip(id, source, frame, reason)] of the committed skipped records."""
        from pipeline.data.base import Skip

        cols = [self.column(L.skipped_name(f)) for f in L.SKIP_FIELDS]
        if cols[0] is None:
            return []
        n = len(cols[0])
        values = [c[:] if c is not None else [""] * n for c in cols]
        return [Skip(str(i), str(s), int(fr), str(r))
                for i, s, fr, r in zip(*values)]

    def pngs(self) -> Optional[List[Tuple[str, str]]]:
        """(id, PNG file name or "") per row, as the writer recorded them; None for a run file without them."""
        ids, names = self.column("id"), self.column("png")
        if ids is None or names is None:
            return None
        return list(zip(ids[:], names[:]))

    def png_path(self, row: int, technique: str) -> Optional[Path]:
        """The PNG drawn for a row by a technique, or None when the row was not drawn."""
        names = self.column("png")
        name = names[row] if names is not None else ""
        return self.path.parent / "png" / technique / name if name else None

    def columns(self) -> Dict[str, Column]:
        """Every dataset by name (row datasets: their committed rows only)."""
        return {name: self.column(name) for name in datasets(self._file) if not L.is_partial(name)}

    def row_columns(self) -> Dict[str, Column]:
        """Every row dataset (skipped/* included) by name."""
        return {name: self.column(name) for name, ds in datasets(self._file).items()
                if is_row_dataset(ds) and not L.is_partial(name)}

    def fixed_columns(self) -> Dict[str, Column]:
        """Every dataset that does not grow with rows, summaries excluded, by name."""
        return {name: Column(ds, None) for name, ds in datasets(self._file).items()
                if not is_row_dataset(ds) and not L.is_partial(name) and name.split("/")[0] != L.SUMMARY}

    def maps(self, technique: str) -> Dict[Tuple[str, str], Column]:
        """{(layer, output): Column [rows, ...]} of one technique's row maps (no metrics)."""
        out: Dict[Tuple[str, str], Column] = {}
        for name, col in self.row_columns().items():
            parts = L.split_map_name(name)
            if parts and parts[0] == technique and parts[3] is None:
                out[parts[1], parts[2]] = col
        return out

    def map_columns(self) -> Dict[str, Column]:
        """Numeric row datasets of techniques (maps, metrics; float or uint8 images), by name."""
        return {name: col for name, col in self.row_columns().items()
                if L.split_map_name(name) and not col.is_str and np.dtype(col.stored_dtype).kind in "fu"}

    def metrics(self) -> Dict[Tuple[str, str, str, str], Column]:
        """{(technique, layer, output, metric): Column} of the evaluations (evaluate.*)."""
        out = {}
        for name, col in self.row_columns().items():
            parts = L.split_map_name(name)
            if parts and parts[3] is not None:
                out[parts] = col
        return out

    # -- run-level groups ------------------------------------------------------------------------
    def classes(self) -> Optional[List[str]]:
        col = self.column(L.CLASSES)
        return list(col.read()) if col is not None else None

    def field_table(self) -> Dict[str, np.ndarray]:
        return self._group(L.FIELD_TABLE)

    def generated(self, technique: str) -> Dict[Tuple[str, str], np.ndarray]:
        """A data-free technique's results, {(layer, output): array}; {} when absent."""
        return {tuple(name.rsplit("/", 1)): a for name, a in self._group(technique).items()}

    def summaries(self) -> List[str]:
        """Techniques with a (complete) run-level summary group."""
        group = self._file.get(L.SUMMARY)
        return sorted(n for n in group if not L.is_partial(n)) if isinstance(group, h5py.Group) else []

    def summary(self, technique: str) -> Dict[Tuple[str, str], np.ndarray]:
        """summary/<technique>'s arrays, {(layer, output): array} (statistics and facts left out)."""
        arrays = self._group(L.summary_group(technique))
        return {tuple(n.rsplit("/", 1)): a for n, a in arrays.items() if not n.startswith((L.STATS, L.FACTS))}

    def summary_stats(self, technique: str) -> Tuple[Optional[Dict[str, np.ndarray]], int]:
        """(sufficient statistics, rows they cover) of a summary; (None, 0) when absent or unknown."""
        group = self._file.get(L.summary_group(technique))
        if not isinstance(group, h5py.Group) or L.STATS not in group or L.SUMMARY_ROWS not in group.attrs:
            return None, 0
        stats = {name: read_all(ds) for name, ds in datasets(group[L.STATS]).items()}
        return stats, int(group.attrs[L.SUMMARY_ROWS])

    def summary_facts(self, technique: str) -> Dict[Tuple[str, str], Column]:
        """The model-derived values of a summary, {(layer, output): Column}."""
        group = self._file.get(f"{L.summary_group(technique)}/{L.FACTS}")
        if not isinstance(group, h5py.Group):
            return {}
        return {tuple(name.rsplit("/", 1)): Column(ds, None) for name, ds in datasets(group).items()}

    def summary_columns(self, technique: str) -> Dict[str, Column]:
        """Every dataset of summary/<technique> by its path below it (for checks)."""
        group = self._file.get(L.summary_group(technique))
        return {n: Column(ds, None) for n, ds in datasets(group).items()} if isinstance(group, h5py.Group) else {}

    def _group(self, name: str) -> Dict[str, np.ndarray]:
        group = self._file.get(name)
        if not isinstance(group, h5py.Group):
            return {}
        return {n: Column._cast(read_all(ds)) for n, ds in datasets(group).items()}


def run_file(path: str | Path) -> Path:
    """maps.h5 of a run dir (or the file itself)."""
    path = Path(path)
    return path / MAPS if path.is_dir() else path


def open_run(path: str | Path) -> RunReader:
    """Open a run dir's maps.h5 (or a maps.h5 path) for reading. Raises OSError when it cannot be
    opened as HDF5 (FileNotFoundError when absent)."""
    file = run_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    return RunReader(h5py.File(file, "r", locking=False), file)
