"""The checks `pipeline.merge` runs on the shards before anything is written. Each appends its
findings to `errors` (a merge stops on any) or `warnings`; shards are read through the run store."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from pipeline.store import MAPS, Column, RunReader, open_run
from pipeline.store.layout import SKIP_FIELDS, skipped_name, split_map_name

SHOW = 20  # ids listed in a message before "... (N in all)"


class MergeError(ValueError):
    """The shards cannot be merged; the message says why, naming the dirs, shards and ids."""


@dataclass
class Shard:
    dir: Path
    run: RunReader
    run_key: dict
    label: str  # "i/n" or "all"
    index: int
    count: int
    row_sets: Dict[str, Column] = field(default_factory=dict)  # rows and skipped/*
    fixed: Dict[str, Column] = field(default_factory=dict)  # datasets that do not grow with rows

    @property
    def name(self) -> str:
        return f"{self.dir} [{self.label}]"

    @property
    def rows(self) -> int:
        return self.run.rows

    @property
    def skipped_rows(self) -> int:
        return self.run.skipped_rows

    def length(self, name: str) -> int:
        return self.skipped_rows if name.startswith("skipped/") else self.rows


def some(values: Sequence[str], limit: int = SHOW) -> str:
    values = list(values)
    text = ", ".join(values[:limit])
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def short(value, limit: int = 60) -> str:
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
            sa = "absent" if va is _ABSENT else short(va)
            sb = "absent" if vb is _ABSENT else short(vb)
            out.append(f"{path} ({sa} != {sb})")
    return out


def _parse_label(label: str) -> Optional[Tuple[int, int]]:
    from pipeline.data.shard import parse_shard

    try:
        return parse_shard(str(label))
    except ValueError:  # ConfigError included
        raise MergeError(f"shard {label!r} is neither i/n nor all") from None


def open_shards(dirs: Sequence[Path], stack: ExitStack, errors: List[str]) -> List[Shard]:
    shards: List[Shard] = []
    for d in dirs:
        shard = _open(d, stack, errors)
        if shard is not None:
            shards.append(shard)
    return shards


def _open(d: Path, stack: ExitStack, errors: List[str]) -> Optional[Shard]:
    path = d / MAPS
    if not d.exists():
        return errors.append(f"{d} does not exist")
    if not d.is_dir():
        return errors.append(f"{d} is not a run dir (not a directory)")
    if not path.is_file():
        return errors.append(f"{d} is not a run dir: it has no {MAPS}")
    try:
        run = stack.enter_context(open_run(path))
    except OSError as err:
        return errors.append(f"{path} cannot be opened ({err}); is a run still writing it?")
    if not run.is_pipeline_run:
        return errors.append(f"{path} is not a pipeline maps.h5 (no run_key attribute)")
    try:
        key = run.run_key
    except (TypeError, ValueError) as err:
        return errors.append(f"{path}: run_key is not JSON ({err})")
    label = run.shard
    try:
        parsed = _parse_label(label)
    except MergeError as err:
        return errors.append(f"{d}: {err}")
    index, count = parsed if parsed is not None else (0, 1)
    shard = Shard(d, run, key, label, index, count, run.row_columns(), run.fixed_columns())
    for name in run.half_written():
        errors.append(f"{shard.name}: {name} is a half-written group (the run was killed); resume the run first")
    return shard


def check_keys(shards: List[Shard], errors: List[str]) -> None:
    first = shards[0]
    for s in shards[1:]:
        diff = key_differences(first.run_key, s.run_key)
        if diff:
            errors.append(f"run_key of {s.dir} differs from {first.dir}'s (apart from data.shard) at: "
                          + "; ".join(diff))


def check_shards(shards: List[Shard], errors: List[str]) -> None:
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
    by_index: Dict[int, List[Shard]] = defaultdict(list)
    for s in shards:
        by_index[s.index].append(s)
    missing = [f"{i}/{n}" for i in range(n) if i not in by_index]
    if missing:
        errors.append(f"shard(s) {', '.join(missing)} missing (each of 0/{n} ... {n - 1}/{n} is needed once)")
    for i, group in sorted(by_index.items()):
        if len(group) > 1:
            errors.append(f"shard {group[0].label} is given {len(group)} times: "
                          + ", ".join(str(s.dir) for s in group))


def check_ids(shards: List[Shard], errors: List[str], warnings: List[str]) -> bool:
    """Every id once across rows and skipped records; returns whether completeness was checked."""
    where: Dict[str, List[str]] = defaultdict(list)
    for s in shards:
        for i in s.run.ids() + [r.id for r in s.run.skipped()]:
            where[i].append(s.name)
    twice = sorted(i for i, places in where.items() if len(places) > 1)
    if twice:
        shown = [f"{i} (in {', '.join(where[i])})" for i in twice[:SHOW]]
        more = f", ... ({len(twice)} in all)" if len(twice) > SHOW else ""
        errors.append(f"{len(twice)} input(s) appear more than once: " + "; ".join(shown) + more)
    return _check_complete(shards[0], set(where), errors, warnings)


def _full_source(s: Shard):
    """The unsharded source of a shard's recorded config (ConfigError when its path is gone)."""
    from omegaconf import OmegaConf

    from pipeline.data import build_source

    data = OmegaConf.create(s.run.config).data
    data.shard = "all"
    return build_source(data)


def _check_complete(first: Shard, present: set, errors: List[str], warnings: List[str]) -> bool:
    if first.run.config is None:
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
        errors.append(f"{len(missing)} input(s) of the full input list are in no shard: {some(missing)}")
    extra = sorted(present - set(expected))
    if extra:
        warnings.append(f"{len(extra)} input(s) in the shards are not in the input list as it is now "
                        f"(did the data change since the runs?): {some(extra)}")
    return True


def check_datasets(shards: List[Shard], errors: List[str]) -> None:
    """Row datasets: the same names, row shapes and dtypes in every shard that has such rows;
    datasets that do not grow with rows: identical everywhere."""
    names = sorted({n for s in shards for n in s.row_sets if s.length(n)})
    for name in names:
        _check_rows(shards, name, errors)
    _check_declared(shards, names, errors)
    skipped = sorted({n for n in names if n.startswith("skipped/")})
    expected = sorted(skipped_name(f) for f in SKIP_FIELDS)
    if skipped and skipped != expected:
        errors.append(f"skipped records have datasets {skipped}; expected {expected}")
    for name in sorted({n for s in shards for n in s.fixed}):
        holders = [s for s in shards if name in s.fixed]
        lacking = [s.name for s in shards if name not in s.fixed]
        if lacking:
            errors.append(f"dataset {name} is missing in {', '.join(lacking)}")
            continue
        ref = holders[0]
        differ = [s.name for s in holders[1:] if not ref.fixed[name].equals(s.fixed[name])]
        if differ:
            errors.append(f"dataset {name} differs between {ref.name} and {', '.join(differ)}")


def _check_declared(shards: List[Shard], names: List[str], errors: List[str]) -> None:
    """Every map row dataset is an output its technique declares (or an evaluation of one)."""
    from pipeline.techniques import REGISTRY

    for name in names:
        parts = split_map_name(name)
        if parts is None or parts[3] is not None or parts[0] not in REGISTRY:
            continue
        technique, _, output, _ = parts
        declared = REGISTRY[technique].outputs
        if output not in declared:
            holders = ", ".join(s.name for s in shards if name in s.row_sets)
            errors.append(f"row dataset {name} in {holders} is not an output {technique} declares "
                          f"({', '.join(sorted(declared))})")


def _check_rows(shards: List[Shard], name: str, errors: List[str]) -> None:
    ref: Optional[Shard] = None
    for s in shards:
        if not s.length(name):
            continue
        col = s.row_sets.get(name)
        if col is None:
            errors.append(f"row dataset {name} is missing in {s.name}")
            continue
        if len(col) < s.length(name):
            errors.append(f"row dataset {name} in {s.name} has {len(col)} rows, fewer than the "
                          f"{s.length(name)} committed")
            continue
        if ref is None:
            ref = s
            continue
        r = ref.row_sets[name]
        if not r.same_layout(col):
            errors.append(f"row dataset {name}: {ref.name} has rows {r.shape[1:]} {r.stored_dtype}, "
                          f"{s.name} {col.shape[1:]} {col.stored_dtype}")


def provenance_warnings(shards: List[Shard], warnings: List[str]) -> None:
    for attr in ("git_commit", "versions"):
        values = {str(s.run.attrs.get(attr, "")) for s in shards}
        if len(values) > 1:
            warnings.append(f"the shards differ in {attr}: " + ", ".join(
                f"{s.dir}: {short(str(s.run.attrs.get(attr, '')), 40)}" for s in shards))
    for s in shards:
        attempts = s.run.attempts()
        if attempts and not attempts[-1].get("finished", False):
            warnings.append(f"{s.name}: its last attempt did not finish (killed?)")
    limits = {str(_data_limit(s)) for s in shards}
    if len(limits) > 1:
        warnings.append("the shards were run with different data.limit (the input list is rebuilt with "
                        f"{shards[0].dir}'s): " + ", ".join(f"{s.dir}: {_data_limit(s)}" for s in shards))


def _data_limit(s: Shard):
    """data.limit of a shard's recorded config (None when unreadable: it only feeds a warning)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.create(s.run.config).data.get("limit")
    except Exception:  # noqa: BLE001 - only for a warning
        return None
