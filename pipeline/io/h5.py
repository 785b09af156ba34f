"""maps.h5: one row per input, appended batch by batch into chunked, compressed, resizable datasets.

Crash safety: a batch is written to every row dataset, then the attribute `rows` is raised and
the file flushed. On reopening, every row dataset is cut back to `rows`, so a run killed mid-write
loses only the uncommitted batch, which the resumed run computes again (no row lost or duplicated).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set

import h5py
import numpy as np

from pipeline.config import ConfigError
from pipeline.io.space import DiskFull, is_disk_full, reserve

STR = h5py.string_dtype()
SKIP_FIELDS = ("id", "source", "frame", "reason")
CHUNK_BYTES = 1 << 16  # small rows are grouped up to this size; a larger map is one chunk per row
META_BYTES = 1 << 18  # room reserved for HDF5's own metadata on every write (object headers, B-trees, heaps)


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


def append_bytes(columns: Dict[str, np.ndarray]) -> int:
    """An upper bound on the bytes one appended batch may add to the file: twice the raw data (lzf
    can grow incompressible data a little), one chunk per dataset (HDF5 rewrites a partly filled
    chunk elsewhere) and room for metadata."""
    return META_BYTES + sum(2 * data_bytes(data) + CHUNK_BYTES for data in columns.values())


def data_bytes(data) -> int:
    """The bytes an array takes in the file, uncompressed: strings as their length + 64 each."""
    data = np.asarray(data)
    return sum(len(str(v)) + 64 for v in data.ravel()) if data.dtype.kind in "OUS" else data.nbytes


def key_differences(old, new, prefix: str = "") -> List[str]:
    """`key: old -> new` for every setting of two run keys that differs (dotted config keys). A key
    the old run did not have (a run made before the key existed) matches null or false, the value
    that switches a new feature off (e.g. data.max_pixels=null data.reduced_decode=false)."""
    out: List[str] = []
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                if new[k] is not None and new[k] is not False:
                    out.append(f"{name}: (not set) -> {_show(new[k])}")
            elif k not in new:
                out.append(f"{name}: {_show(old[k])} -> (not set)")
            else:
                out.extend(key_differences(old[k], new[k], name))
    elif old != new:
        out.append(f"{prefix}: {_show(old)} -> {_show(new)}")
    return out


def _show(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def check_resumable(path: Path, run_key: dict) -> None:
    """Raise ConfigError, before anything is written, unless `path` is a pipeline run file that a
    run under `run_key` may resume: an HDF5 file written by the pipeline, under the same key, whose
    committed-row counters do not exceed its datasets. Read-only: a refused file is untouched."""
    try:
        if not h5py.is_hdf5(path):
            raise ConfigError(f"{path} is not an HDF5 file, so it is not a run of this pipeline; use a new "
                              "run dir (hydra.run.dir=...) or move the file away to start this run over")
        with h5py.File(path, "r", locking=False) as f:
            stored = f.attrs.get("run_key")
            if stored is None:
                if len(f) == 0 and len(f.attrs) == 0:
                    return  # an empty file a run created and died before writing to: nothing to keep
                raise ConfigError(f"{path} is an HDF5 file not written by the pipeline (it has no run_key "
                                  "attribute); use a new run dir (hydra.run.dir=...)")
            new = json.loads(json.dumps(run_key, sort_keys=True))
            differences = key_differences(json.loads(stored), new)
            if differences:
                raise ConfigError(
                    f"{path.parent} holds a run with other settings, so it cannot be resumed with these: "
                    + "; ".join(differences) + ". Resume with the old settings, or use a new run dir "
                    "(hydra.run.dir=...)")
            damaged = _damage(f)
            if damaged:
                raise ConfigError(f"{path} is damaged ({damaged}); it cannot be resumed: use a new run dir "
                                  "(hydra.run.dir=...)")
    except OSError as err:
        raise ConfigError(open_error(path, err)) from None


def _damage(f: h5py.File) -> Optional[str]:
    """Why the committed-row counters of `f` do not fit its datasets, or None."""
    rows, skipped = int(f.attrs.get("rows", 0)), int(f.attrs.get("skipped_rows", 0))
    for name, ds in datasets(f).items():
        if not ds.maxshape or ds.maxshape[0] is not None:
            continue
        limit, counter = (skipped, "skipped_rows") if name.startswith("skipped/") else (rows, "rows")
        if ds.shape[0] < limit:
            return f"attribute {counter}={limit} but dataset {name} holds {ds.shape[0]}"
    if rows and "id" not in f:
        return f"attribute rows={rows} but there is no id dataset"
    return None


def open_error(path: Path, err: BaseException) -> str:
    """The message for a maps.h5 that HDF5 cannot open: locked by another process (named, when it
    can be found), or unreadable."""
    text = str(err)
    if "lock" in text.lower():
        holders = processes_holding(path)
        who = ", ".join(f"pid {pid} ({cmd})" for pid, cmd in holders) if holders else "another process"
        return (f"{path} is open in {who}, which locks it: close it there and run again (to read a "
                "maps.h5 while a run writes it, open it with h5py.File(path, 'r', locking=False))")
    return (f"{path} exists but cannot be opened as HDF5 ({text.splitlines()[0][:200]}); use a new run dir "
            "(hydra.run.dir=...) or move the file away to start this run over")


def processes_holding(path: Path) -> List[tuple]:
    """[(pid, command line)] of other processes with `path` open (Linux /proc; [] elsewhere)."""
    target, found = os.path.realpath(path), []
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(os.path.realpath(fd) == target for fd in (entry / "fd").iterdir()):
                cmd = " ".join((entry / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split())
                found.append((int(entry.name), cmd[:120]))
        except OSError:
            continue
    return found


class MapsFile:
    """Appends rows to `path`. `run_key` identifies what the rows mean (model, data, techniques,
    layers, target); reopening a file written under another key raises ConfigError naming the keys
    that differ, and a file that is not a pipeline run's (or is damaged) is refused; a refused open
    leaves the file untouched. Every write first reserves its room on disk (pipeline.io.space), so
    a full disk raises DiskFull before HDF5 writes anything and the committed rows stay readable."""

    def __init__(self, path: str | Path, run_key: dict, attrs: Optional[Dict[str, str]] = None):
        self.path = Path(path)
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
        self.reserve(META_BYTES + sum(len(str(v)) for v in (attrs or {}).values()) + len(key))
        self.f.attrs["run_key"] = key
        for name, value in (attrs or {}).items():
            self.f.attrs[name] = value
        self.rows = int(self.f.attrs.get("rows", 0))
        self.skipped_rows = int(self.f.attrs.get("skipped_rows", 0))
        self._truncate()

    def reserve(self, nbytes: int) -> None:
        """Room for the next write: `nbytes` allocated past the end of the file (or DiskFull)."""
        reserve(self._fd, nbytes, self.path)

    def set_attr(self, name: str, value) -> None:
        """One attribute (e.g. the attempts record), written with its room reserved, and flushed."""
        self.reserve(META_BYTES + 2 * len(str(value)))
        self.f.attrs[name] = value
        self.f.flush()

    # -- reading back -------------------------------------------------------------------------
    def _row_datasets(self) -> List[h5py.Dataset]:
        return [d for d in datasets(self.f).values() if d.maxshape and d.maxshape[0] is None]

    def _truncate(self) -> None:
        """Cut every row dataset back to the committed count (drops a half-written batch; a file
        whose counters exceed its datasets never gets here: check_resumable refuses it)."""
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
        self.reserve(append_bytes(columns))
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
        self.reserve(META_BYTES + 4 * sum(len(r.id) + len(r.source) + len(r.reason) + 8 for r in records))
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

    def group_arrays(self, group: str) -> Dict[tuple, np.ndarray]:
        """{(layer, output): array} of a group written by write_group (`<group>/<layer>/<output>`)."""
        out: Dict[tuple, np.ndarray] = {}
        for name, ds in datasets(self.f[group]).items():
            layer, _, output = name.rpartition("/")
            data = ds[()]
            out[layer, output] = np.asarray(decode_strings(data)) if ds.dtype.kind in "OS" else data
        return out

    def has(self, name: str) -> bool:
        return name in self.f

    def write_group(self, group: str, arrays: Dict[str, np.ndarray]) -> None:
        """Fixed-size results of a data-free technique under `group`; the group is marked complete
        last, so a run killed mid-write redoes it (and `has(group)` stays False until then)."""
        self.reserve(META_BYTES + 2 * sum(data_bytes(a) for a in arrays.values()))
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
            self.reserve(META_BYTES + 2 * data_bytes(data))
            self.f.create_dataset(name, data=data.astype(object) if data.dtype.kind in "OUS" else data,
                                  dtype=STR if data.dtype.kind in "OUS" else data.dtype)

    def close(self) -> None:
        if self.f.id.valid:
            self.f.flush()
            self.f.close()
