"""`python -m pipeline.merge DIR... --out merged.h5`: merge the `maps.h5` of a sharded run
(`data.shard=i/n`, one run dir per shard) into one file laid out like an unsharded run's.

Everything is checked before anything is written; a failed check raises `MergeError` (the CLI:
the message on stderr, exit code 2) and leaves no output file:

- every dir has a readable maps.h5 whose `run_key` equals the others' apart from `data.shard`;
- the shards are i/n with one n and every i in 0..n-1 exactly once;
- every input is in exactly one shard, as a row or as a skipped record, and no input of the full
  list (rebuilt from the recorded config's `data` with `shard=all`) is missing;
- the row datasets agree in name, row shape and dtype; the datasets that do not grow with rows
  (`classes`, `receptive_fields/*`, data-free technique groups) are identical in every shard;
- every `summary/<technique>` group is one this module knows how to recompute (`erf`).

The output is written to a temporary file next to `--out` and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from pipeline.io.h5 import SKIP_FIELDS, MapsFile, decode_strings

MAPS = "maps.h5"
SHOW = 20  # ids listed in a message before "... (N in all)"
READ_BYTES = 64 << 20  # rows are copied in blocks of about this size
ERF_OUTPUTS = {"mean", "sigma", "rf_box", "rf"}
# attributes not copied from shard 0 as they are (recomputed or set by the merge)
OWN_ATTRS = {"run_key", "rows", "skipped_rows", "attempts", "config", "shard", "merged_from"}


class MergeError(ValueError):
    """The shards cannot be merged; the message says why, naming the dirs, shards and ids."""


@dataclass
class MergeReport:
    out: Path
    shards: List[Tuple[Path, str]]  # (dir, "i/n") in merge order
    rows: int
    skipped_rows: int
    completeness_checked: bool
    warnings: List[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"merged {len(self.shards)} shard(s) ({self.rows} rows, {self.skipped_rows} skipped) "
                f"-> {self.out}")


@dataclass
class _Shard:
    dir: Path
    f: h5py.File
    run_key: dict
    label: str  # "i/n" or "all"
    index: int
    count: int
    rows: int
    skipped_rows: int
    row_sets: Dict[str, h5py.Dataset] = field(default_factory=dict)  # name -> dataset, rows and skipped/*
    fixed: Dict[str, h5py.Dataset] = field(default_factory=dict)  # datasets that do not grow with rows
    summary: Dict[str, h5py.Dataset] = field(default_factory=dict)  # summary/...

    @property
    def name(self) -> str:
        return f"{self.dir} [{self.label}]"

    def length(self, name: str) -> int:
        return self.skipped_rows if name.startswith("skipped/") else self.rows


# -- small helpers -------------------------------------------------------------------------------
def _some(values: Sequence[str], limit: int = SHOW) -> str:
    values = list(values)
    text = ", ".join(values[:limit])
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_ABSENT = object()


def _flatten(value, prefix: str = "") -> Dict[str, object]:
    """{"a.b.c": leaf} of nested dicts (lists are leaves)."""
    if isinstance(value, dict) and value:
        out: Dict[str, object] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def key_differences(a: dict, b: dict, ignore: Iterable[str] = ("data.shard",)) -> List[str]:
    """Dotted paths whose values differ between two run keys, as "path (a != b)"."""
    fa, fb = _flatten(a), _flatten(b)
    out = []
    for path in sorted(set(fa) | set(fb)):
        if path in ignore:
            continue
        va, vb = fa.get(path, _ABSENT), fb.get(path, _ABSENT)
        if va != vb:
            sa = "absent" if va is _ABSENT else _short(va)
            sb = "absent" if vb is _ABSENT else _short(vb)
            out.append(f"{path} ({sa} != {sb})")
    return out


def _is_str(ds: h5py.Dataset) -> bool:
    return h5py.check_string_dtype(ds.dtype) is not None


def _read(ds: h5py.Dataset, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
    return ds.asstr()[start:stop] if _is_str(ds) else ds[start:stop]


def _same_dtype(a: h5py.Dataset, b: h5py.Dataset) -> bool:
    if _is_str(a) or _is_str(b):
        return _is_str(a) and _is_str(b)
    return a.dtype == b.dtype


def _equal(a: h5py.Dataset, b: h5py.Dataset) -> bool:
    if a.shape != b.shape or not _same_dtype(a, b):
        return False
    x, y = (ds.asstr()[()] if _is_str(ds) else ds[()] for ds in (a, b))
    if _is_str(a):
        return np.asarray(x, dtype=object).tolist() == np.asarray(y, dtype=object).tolist()
    x, y = np.asarray(x), np.asarray(y)
    return bool(np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"))


def _parse_label(label: str) -> Optional[Tuple[int, int]]:
    from pipeline.data.shard import parse_shard

    try:
        return parse_shard(str(label))
    except ValueError:  # ConfigError included
        raise MergeError(f"shard {label!r} is neither i/n nor all") from None


# -- reading the shards --------------------------------------------------------------------------
def _open(dirs: Sequence[Path], stack: ExitStack, errors: List[str]) -> List[_Shard]:
    shards: List[_Shard] = []
    for d in dirs:
        path = d / MAPS
        if not d.exists():
            errors.append(f"{d} does not exist")
            continue
        if not d.is_dir():
            errors.append(f"{d} is not a run dir (not a directory)")
            continue
        if not path.is_file():
            errors.append(f"{d} is not a run dir: it has no {MAPS}")
            continue
        try:
            f = stack.enter_context(h5py.File(path, "r"))
        except OSError as err:
            errors.append(f"{path} cannot be opened ({err}); is a run still writing it?")
            continue
        if "run_key" not in f.attrs:
            errors.append(f"{path} is not a pipeline maps.h5 (no run_key attribute)")
            continue
        try:
            key = json.loads(f.attrs["run_key"])
        except (TypeError, ValueError) as err:
            errors.append(f"{path}: run_key is not JSON ({err})")
            continue
        label = str((key.get("data") or {}).get("shard", f.attrs.get("shard", "all")))
        try:
            parsed = _parse_label(label)
        except MergeError as err:
            errors.append(f"{d}: {err}")
            continue
        index, count = parsed if parsed is not None else (0, 1)
        shard = _Shard(d, f, key, label, index, count, int(f.attrs.get("rows", 0)),
                       int(f.attrs.get("skipped_rows", 0)))
        _classify(shard, errors)
        shards.append(shard)
    return shards


def _classify(s: _Shard, errors: List[str]) -> None:
    def visit(name: str, obj) -> None:
        if name.endswith(".partial") or ".partial/" in name:
            errors.append(f"{s.name}: {name} is a half-written group (the run was killed); resume the run first")
            return
        if not isinstance(obj, h5py.Dataset):
            return
        if name == "summary" or name.startswith("summary/"):
            s.summary[name] = obj
        elif obj.maxshape and obj.maxshape[0] is None:
            s.row_sets[name] = obj
        else:
            s.fixed[name] = obj

    s.f.visititems(visit)


def _check_keys(shards: List[_Shard], errors: List[str]) -> None:
    first = shards[0]
    for s in shards[1:]:
        diff = key_differences(first.run_key, s.run_key)
        if diff:
            errors.append(f"run_key of {s.dir} differs from {first.dir}'s (apart from data.shard) at: "
                          + "; ".join(diff))


def _check_shards(shards: List[_Shard], errors: List[str]) -> None:
    seen: Dict[Path, List[Path]] = defaultdict(list)
    for s in shards:
        seen[s.dir.resolve()].append(s.dir)
    for path, given in seen.items():
        if len(given) > 1:
            errors.append(f"{path} is given {len(given)} times")
    counts = Counter(s.count for s in shards)
    if len(counts) > 1:
        errors.append("the shards split the inputs in different numbers of parts: "
                      + ", ".join(f"{s.dir} [{s.label}]" for s in shards))
        return
    (n,) = counts
    by_index: Dict[int, List[_Shard]] = defaultdict(list)
    for s in shards:
        by_index[s.index].append(s)
    missing = [f"{i}/{n}" for i in range(n) if i not in by_index]
    if missing:
        errors.append(f"shard(s) {', '.join(missing)} missing (each of 0/{n} ... {n - 1}/{n} is needed once)")
    for i, group in sorted(by_index.items()):
        if len(group) > 1:
            errors.append(f"shard {group[0].label} is given {len(group)} times: "
                          + ", ".join(str(s.dir) for s in group))


def _ids(s: _Shard) -> List[str]:
    out: List[str] = []
    if s.rows and "id" in s.f:
        out += decode_strings(s.f["id"][: s.rows])
    if s.skipped_rows and "skipped/id" in s.f:
        out += decode_strings(s.f["skipped/id"][: s.skipped_rows])
    return out


def _check_ids(shards: List[_Shard], errors: List[str], warnings: List[str]) -> bool:
    """Every id once across rows and skipped records; returns whether completeness was checked."""
    where: Dict[str, List[str]] = defaultdict(list)
    for s in shards:
        for i in _ids(s):
            where[i].append(s.name)
    twice = sorted(i for i, places in where.items() if len(places) > 1)
    if twice:
        shown = [f"{i} (in {', '.join(where[i])})" for i in twice[:SHOW]]
        more = f", ... ({len(twice)} in all)" if len(twice) > SHOW else ""
        errors.append(f"{len(twice)} input(s) appear more than once: " + "; ".join(shown) + more)
    return _check_complete(shards[0], set(where), errors, warnings)


def _full_source(s: _Shard):
    """The unsharded source of a shard's recorded config (ConfigError when its path is gone)."""
    from omegaconf import OmegaConf

    from pipeline.data import build_source

    cfg = OmegaConf.create(s.f.attrs["config"])
    data = cfg.data
    data.shard = "all"
    return build_source(data)


def _check_complete(first: _Shard, present: set, errors: List[str], warnings: List[str]) -> bool:
    if "config" not in first.f.attrs:
        warnings.append(f"{first.dir}: maps.h5 has no config attribute; completeness not checked")
        return False
    from pipeline.config import ConfigError

    try:
        source = _full_source(first)
    except (ConfigError, OSError) as err:
        warnings.append(f"cannot rebuild the input list from {first.dir}'s config ({err}); "
                        "completeness (missing inputs) not checked")
        return False
    expected = [it.id for it in source.items] + [s.id for s in source.skipped]
    missing = [i for i in expected if i not in present]
    if missing:
        errors.append(f"{len(missing)} input(s) of the full input list are in no shard: {_some(missing)}")
    extra = sorted(present - set(expected))
    if extra:
        warnings.append(f"{len(extra)} input(s) in the shards are not in the input list as it is now "
                        f"(did the data change since the runs?): {_some(extra)}")
    return True


def _check_datasets(shards: List[_Shard], errors: List[str]) -> None:
    # row datasets: the same names, row shapes and dtypes in every shard that has such rows
    names = sorted({n for s in shards for n in s.row_sets if s.length(n)})
    for name in names:
        ref: Optional[_Shard] = None
        for s in shards:
            if not s.length(name):
                continue
            ds = s.row_sets.get(name)
            if ds is None:
                errors.append(f"row dataset {name} is missing in {s.name}")
                continue
            if ds.shape[0] < s.length(name):
                errors.append(f"row dataset {name} in {s.name} has {ds.shape[0]} rows, fewer than the "
                              f"{s.length(name)} committed")
                continue
            if ref is None:
                ref = s
                continue
            r = ref.row_sets[name]
            if r.shape[1:] != ds.shape[1:] or not _same_dtype(r, ds):
                errors.append(f"row dataset {name}: {ref.name} has rows {r.shape[1:]} {r.dtype}, "
                              f"{s.name} {ds.shape[1:]} {ds.dtype}")
    skipped = sorted({n for n in names if n.startswith("skipped/")})
    if skipped and skipped != sorted(f"skipped/{f}" for f in SKIP_FIELDS):
        errors.append(f"skipped records have datasets {skipped}; expected {[f'skipped/{f}' for f in SKIP_FIELDS]}")
    # datasets that do not grow with rows: identical everywhere
    for name in sorted({n for s in shards for n in s.fixed}):
        holders = [s for s in shards if name in s.fixed]
        lacking = [s.name for s in shards if name not in s.fixed]
        if lacking:
            errors.append(f"dataset {name} is missing in {', '.join(lacking)}")
            continue
        ref = holders[0]
        differ = [s.name for s in holders[1:] if not _equal(ref.fixed[name], s.fixed[name])]
        if differ:
            errors.append(f"dataset {name} differs between {ref.name} and {', '.join(differ)}")


def _erf_layers(shards: List[_Shard], errors: List[str]) -> Dict[str, Dict[str, h5py.Dataset]]:
    """{layer: {"rf_box": ds, "rf": ds}} from the shards' summary/erf groups, after checking that
    every summary group is erf's and that rf_box / rf agree."""
    layers: Dict[str, Dict[str, h5py.Dataset]] = {}
    holders: Dict[str, str] = {}
    for s in shards:
        for name, ds in s.summary.items():
            parts = name.split("/")
            if len(parts) < 2 or parts[1] != "erf":
                technique = parts[1] if len(parts) > 1 else name
                errors.append(f"{s.name}: summary/{technique} ({name}) is a run-level summary this merge "
                              "does not know how to recompute over the merged rows")
                continue
            if len(parts) != 4 or parts[3] not in ERF_OUTPUTS:
                errors.append(f"{s.name}: {name} is not a known erf summary output ({sorted(ERF_OUTPUTS)})")
                continue
            layer, output = parts[2], parts[3]
            if output not in ("rf_box", "rf"):
                layers.setdefault(layer, {})
                continue
            got = layers.setdefault(layer, {})
            if output not in got:
                got[output], holders[f"{layer}/{output}"] = ds, s.name
            elif not _equal(got[output], ds):
                errors.append(f"{name} differs between {holders[f'{layer}/{output}']} and {s.name}")
    return layers


# -- writing ----------------------------------------------------------------------------------------
def _row_step(datasets: Iterable[h5py.Dataset]) -> int:
    row_bytes = sum(int(np.prod(ds.shape[1:], dtype=np.int64)) * (8 if _is_str(ds) else ds.dtype.itemsize)
                    for ds in datasets)
    return max(1, READ_BYTES // max(row_bytes, 1))


def _copy_fixed(src: h5py.File, dst: h5py.File, names: Iterable[str]) -> None:
    for name in names:
        parent, _, base = name.rpartition("/")
        group = dst.require_group(parent) if parent else dst
        src.copy(src[name], group, name=base)


def _copy_group_attrs(src: h5py.File, dst: h5py.File) -> None:
    def visit(name: str, obj) -> None:
        if name in dst and not dst[name].attrs.keys() and obj.attrs.keys():
            for key, value in obj.attrs.items():
                dst[name].attrs[key] = value

    src.visititems(visit)


def _write(shards: List[_Shard], tmp: Path, run_key: dict, config: Optional[str], merged_from: list,
           erf: Dict[str, Dict[str, h5py.Dataset]], warnings: List[str]) -> Tuple[int, int]:
    from pipeline.data.base import Skip

    first = shards[0]
    attrs = {k: v for k, v in first.f.attrs.items() if k not in OWN_ATTRS}
    attrs["shard"] = "all"
    if config is not None:
        attrs["config"] = config
    attempts: list = []
    for s in shards:
        attempts += json.loads(s.f.attrs.get("attempts", "[]"))
    attrs["attempts"] = json.dumps(attempts)
    attrs["merged_from"] = json.dumps(merged_from)
    out = MapsFile(tmp, run_key, attrs)
    try:
        _copy_fixed(first.f, out.f, sorted(first.fixed))
        for s in shards:
            names = [n for n in s.row_sets if not n.startswith("skipped/")]
            if not s.rows or not names:
                continue
            step = _row_step(s.row_sets[n] for n in names)
            for start in range(0, s.rows, step):
                stop = min(start + step, s.rows)
                out.append({n: _read(s.row_sets[n], start, stop) for n in names})
        for s in shards:
            if not s.skipped_rows:
                continue
            cols = {f: _read(s.row_sets[f"skipped/{f}"], 0, s.skipped_rows) for f in SKIP_FIELDS}
            out.append_skipped(Skip(str(i), str(src), int(frame), str(reason))
                               for i, src, frame, reason in zip(*(cols[f] for f in SKIP_FIELDS)))
        out.f.attrs["rows"], out.f.attrs["skipped_rows"] = out.rows, out.skipped_rows
        _write_erf(out, erf, warnings)
        _copy_group_attrs(first.f, out.f)
        for name in first.row_sets:  # dataset attributes, if a writer set any
            if name in out.f:
                for key, value in first.row_sets[name].attrs.items():
                    out.f[name].attrs[key] = value
        return out.rows, out.skipped_rows
    finally:
        out.close()


def _write_erf(out: MapsFile, layers: Dict[str, Dict[str, h5py.Dataset]], warnings: List[str]) -> None:
    """summary/erf over the merged rows: the same computation as the erf technique's own summary."""
    if out.rows == 0:
        return
    if not layers:
        if out.technique_rows("erf"):
            warnings.append("erf rows but no shard has summary/erf (none finished?); summary left out")
        return
    from pipeline.techniques.erf import EffectiveReceptiveField

    rows = out.technique_rows("erf")
    arrays: Dict[str, np.ndarray] = {}
    for layer, known in sorted(layers.items()):
        if (layer, "map") not in rows:
            warnings.append(f"summary/erf/{layer}: no erf/{layer}/map rows to average; summary left out")
            continue
        result = EffectiveReceptiveField().summarize({(layer, "map"): rows[layer, "map"]})
        arrays[f"{layer}/mean"] = result[layer, "mean"]
        arrays[f"{layer}/sigma"] = result[layer, "sigma"]
        for output in ("rf_box", "rf"):
            if output in known:
                arrays[f"{layer}/{output}"] = np.asarray(known[output][()])
            else:
                warnings.append(f"summary/erf/{layer}/{output} is in no shard; left out")
    if arrays:
        out.write_group("summary/erf", arrays)


def _merged_config(text: Optional[str]) -> Optional[str]:
    if text is None:
        return None
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(text)
    if "data" in cfg:
        cfg.data.shard = "all"
    return OmegaConf.to_yaml(cfg)


def _provenance_warnings(shards: List[_Shard], warnings: List[str]) -> None:
    for attr in ("git_commit", "versions"):
        values = {str(s.f.attrs.get(attr, "")) for s in shards}
        if len(values) > 1:
            warnings.append(f"the shards differ in {attr}: " + ", ".join(
                f"{s.dir}: {_short(str(s.f.attrs.get(attr, '')), 40)}" for s in shards))
    for s in shards:
        attempts = json.loads(s.f.attrs.get("attempts", "[]"))
        if attempts and not attempts[-1].get("finished", False):
            warnings.append(f"{s.name}: its last attempt did not finish (killed?)")
    limits = {str(_data_limit(s)) for s in shards}
    if len(limits) > 1:
        warnings.append("the shards were run with different data.limit (the input list is rebuilt with "
                        f"{shards[0].dir}'s): " + ", ".join(f"{s.dir}: {_data_limit(s)}" for s in shards))


def _data_limit(s: _Shard):
    """data.limit of a shard's recorded config (None when unreadable: it only feeds a warning)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.create(s.f.attrs["config"]).data.get("limit")
    except Exception:  # noqa: BLE001 - only for a warning
        return None


# -- the API ----------------------------------------------------------------------------------------
def _check_out(out) -> None:
    """--out must name a file: not an existing directory, not a path ending in a separator, not
    below an existing file. Checked before any shard is read (--force does not change it)."""
    text = os.fspath(out)
    seps = tuple({os.sep, os.altsep or os.sep, "/"})
    if text.endswith(seps) or Path(text).is_dir():
        raise MergeError(f"--out {text} is a directory; --out names the merged file to write, "
                         f"e.g. --out {Path(text) / MAPS}")
    parent = Path(text).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise MergeError(f"--out {text}: {parent} is a file, not a directory")


def merge(dirs: Sequence[Path], out: Path, overwrite: bool = False,
          warn: Optional[Callable[[str], None]] = None) -> MergeReport:
    """Merge the maps.h5 of shard run dirs `dirs` into `out`; raises MergeError (nothing written)
    when a check fails. `warn` gets each warning as it is found (they are also in the report)."""
    dirs = [Path(d) for d in dirs]
    _check_out(out)
    out = Path(out)
    if not dirs:
        raise MergeError("no run dirs given")
    warnings: List[str] = []

    def note(msg: str) -> None:
        warnings.append(msg)
        if warn:
            warn(msg)

    if out.exists() and not overwrite:
        raise MergeError(f"{out} exists; remove it or overwrite it (--force)")
    inputs = {(d / MAPS).resolve() for d in dirs}
    if out.resolve() in inputs:
        raise MergeError(f"{out} is one of the inputs' maps.h5")
    with ExitStack() as stack:
        errors: List[str] = []
        shards = _open(dirs, stack, errors)
        if errors:
            raise MergeError(_message(errors))
        shards.sort(key=lambda s: s.index)  # stable: repeated shards keep the order given
        _check_keys(shards, errors)
        if errors:
            raise MergeError(_message(errors))
        _check_shards(shards, errors)
        found: List[str] = []
        checked = _check_ids(shards, errors, found)
        _check_datasets(shards, errors)
        erf = _erf_layers(shards, errors)
        if errors:
            for w in found:
                note(w)
            raise MergeError(_message(errors))
        _provenance_warnings(shards, found)
        for w in found:
            note(w)

        run_key = json.loads(json.dumps(shards[0].run_key))
        run_key.setdefault("data", {})["shard"] = "all"
        merged_from = [{"dir": str(s.dir.resolve()), "shard": s.label, "rows": s.rows,
                        "skipped_rows": s.skipped_rows} for s in shards]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.merging-{os.getpid()}"
        try:
            write_notes: List[str] = []
            rows, skipped = _write(shards, tmp, run_key, _merged_config(shards[0].f.attrs.get("config")),
                                   merged_from, erf, write_notes)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        for w in write_notes:
            note(w)
    return MergeReport(out, [(s.dir, s.label) for s in shards], rows, skipped, checked, warnings)


def _message(errors: List[str]) -> str:
    if len(errors) == 1:
        return f"cannot merge: {errors[0]}"
    return "cannot merge:\n" + "\n".join(f"  - {e}" for e in errors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.merge",
        description="Merge the maps.h5 of a sharded run (data.shard=i/n, one run dir per shard) into one file.")
    parser.add_argument("dirs", nargs="+", type=Path, help="run dirs, one per shard, each with a maps.h5")
    parser.add_argument("--out", required=True, help="the merged file to write (e.g. merged.h5; not a directory)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)
    try:
        report = merge(args.dirs, args.out, overwrite=args.force,
                       warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    except MergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
