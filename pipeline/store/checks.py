"""Whether a maps.h5 may be resumed, and the messages for one that may not (read-only: a refused
file is left untouched)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import h5py

from pipeline.errors import ConfigError
from pipeline.store.h5util import datasets, is_row_dataset
from pipeline.store.layout import ROWS, RUN_KEY, SKIPPED, SKIPPED_ROWS


# Settings added after runs were made, with the value that means what those runs did: a run key
# without them matches these values (store.dtype=float32: maps were float32 before the option).
LEGACY_DEFAULTS = {"store": {"dtype": "float32"},  # what runs made before these keys existed did
                   "layout": "auto",  # before layouts, every layer was read as it is (auto: the same for CNNs)
                   "precision": "fp32",
                   "score": {"region": None, "min_score": 0.5, "iou": 0.5},  # before pipeline.scores: classifier logits only
                   "evaluate": {"pointing_tolerance": 15, "road_percentages": list(range(10, 100, 10))}}


def key_differences(old, new, prefix: str = "") -> List[str]:
    """`key: old -> new` for every setting of two run keys that differs (dotted config keys). A key
    the old run did not have (a run made before the key existed) matches null or false, the value
    that switches a new feature off (e.g. data.max_pixels=null data.reduced_decode=false), or its
    LEGACY_DEFAULTS value."""
    out: List[str] = []
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                if new[k] is not None and new[k] is not False and not _legacy(name, new[k]):
                    out.append(f"{name}: (not set) -> {_show(new[k])}")
            elif k not in new:
                out.append(f"{name}: {_show(old[k])} -> (not set)")
            else:
                out.extend(key_differences(old[k], new[k], name))
    elif old != new:
        out.append(f"{prefix}: {_show(old)} -> {_show(new)}")
    return out


def _legacy(name: str, value) -> bool:
    """Whether `value` of the dotted setting `name` is what runs made before it existed did."""
    known = LEGACY_DEFAULTS
    for part in name.split("."):
        if not isinstance(known, dict) or part not in known:
            return False
        known = known[part]
    return known == value


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
            stored = f.attrs.get(RUN_KEY)
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
    rows, skipped = int(f.attrs.get(ROWS, 0)), int(f.attrs.get(SKIPPED_ROWS, 0))
    for name, ds in datasets(f).items():
        if not is_row_dataset(ds):
            continue
        limit, counter = (skipped, SKIPPED_ROWS) if name.startswith(f"{SKIPPED}/") else (rows, ROWS)
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
