"""`python -m pipeline.merge DIR... --out merged.h5`: merge the `maps.h5` of a sharded run
(`data.shard=i/n`, one run dir per shard) into one file laid out like an unsharded run's.

Everything is checked before anything is written (pipeline.merge_checks); a failed check raises
`MergeError` (the CLI: the message on stderr, exit code 2) and leaves no output file:

- every dir has a readable maps.h5 whose `run_key` equals the others' apart from `data.shard`;
- the shards are i/n with one n and every i in 0..n-1 exactly once;
- every input is in exactly one shard, as a row or as a skipped record, and no input of the full
  list (rebuilt from the recorded config's `data` with `shard=all`) is missing;
- the row datasets agree in name, row shape and dtype; the datasets that do not grow with rows
  (`classes`, `receptive_fields/*`, data-free technique groups) are identical in every shard;
- every `summary/<technique>` belongs to a technique of the run with a run-level summary, its
  model-derived facts agree between shards, and its arrays are what its statistics give.

Summaries merge by construction, with no technique-specific code here: each shard's sufficient
statistics (as stored, or recomputed from its rows when its run did not finish them) are
combined with the technique's `combine` and finalized with its `finalize` (pipeline.summaries).
The output is written to a temporary file next to `--out` and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from pipeline.merge_checks import (MergeError, Shard, check_datasets, check_ids, check_keys, check_shards,
                                   key_differences, provenance_warnings)
from pipeline.merge_checks import open_shards as _open
from pipeline.store import MAPS, MapsFile
from pipeline.summaries import combine_all, stats_of_rows, stats_of_run

__all__ = ["MergeError", "MergeReport", "key_differences", "main", "merge"]
READ_BYTES = 64 << 20  # rows are copied in blocks of about this size


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


# -- summaries, through the techniques' own combine / finalize --------------------------------------
@dataclass
class SummaryPlan:
    technique: object
    stats: Optional[dict]  # combined over the shards
    facts: Dict[Tuple[str, str], np.ndarray]
    final: Dict[Tuple[str, str], np.ndarray] = field(default_factory=dict)  # finalized and completed


def _summary_techniques(shards: List[Shard], errors: List[str]) -> Dict[str, object]:
    """The run's techniques with a run-level summary (built from the recorded options); a summary
    group of any other name is an error."""
    from pipeline.techniques import REGISTRY

    options = shards[0].run_key.get("technique") or {}
    found = {name: REGISTRY[name](**(opts or {})) for name, opts in options.items()
             if name in REGISTRY and REGISTRY[name].has_summary}
    for s in shards:
        for name in s.run.summaries():
            if name not in found:
                errors.append(f"{s.name}: summary/{name} is a run-level summary of no technique of this run "
                              f"that has one ({', '.join(sorted(found)) or 'none'}), so it cannot be merged")
    return found


def _facts(name: str, technique, s: Shard, errors: List[str]) -> Optional[Dict[Tuple[str, str], np.ndarray]]:
    """A shard's model-derived summary values, after checking its summary arrays are what its
    statistics and facts give; None when the shard has no summary of `name`."""
    if name not in s.run.summaries():
        return None
    facts = {key: col.read() for key, col in s.run.summary_facts(name).items()}
    stats, _ = s.run.summary_stats(name)
    stored = s.run.summary(name)
    completed = {key for key in stored if key[1] in technique.completed_outputs}  # cut from inputs: not re-made here
    if stats is None:  # written before summaries kept their statistics: facts are what finalize does not make
        stats = stats_of_rows(technique, name, s.run)
        made = technique.finalize(stats) if stats is not None else {}
        facts = {key: a for key, a in stored.items() if key not in made and key not in completed}
    expected = {**technique.finalize(stats), **facts}
    for key in sorted((set(stored) - completed) | set(expected)):
        if key not in stored or key not in expected or not _same(stored[key], expected[key]):
            errors.append(f"{s.name}: summary/{name}/{key[0]}/{key[1]} differs from what its statistics and "
                          "model facts give (edited or damaged?)")
    return facts


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "OUS" or b.dtype.kind in "OUS":
        return a.shape == b.shape and a.astype(str).tolist() == b.astype(str).tolist()
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


def plan_summaries(shards: List[Shard], errors: List[str], warnings: List[str]) -> Dict[str, SummaryPlan]:
    plans: Dict[str, SummaryPlan] = {}
    for name, technique in _summary_techniques(shards, errors).items():
        facts: Optional[dict] = None
        holder = ""
        for s in shards:
            got = _facts(name, technique, s, errors)
            if got is None:
                continue
            if facts is None:
                facts, holder = got, s.name
            elif set(got) != set(facts) or any(not _same(got[k], facts[k]) for k in got):
                differ = sorted(k for k in set(got) | set(facts) if k not in got or k not in facts
                                or not _same(got[k], facts[k]))
                errors.append(f"summary/{name}/{differ[0][0]}/{differ[0][1]} differs between {holder} and {s.name}")
        stats = combine_all(technique, (stats_of_run(technique, name, s.run) for s in shards))
        if stats is None:
            continue
        if facts is None:
            warnings.append(f"{name} rows but no shard has summary/{name} (none finished?); its model facts "
                            "are left out of the merged summary")
        plan = SummaryPlan(technique, stats, facts or {})
        plan.final = technique.finalize(stats)
        try:  # what is cut from inputs (dataset examples' patches) comes from the shards' summaries
            plan.final.update(technique.complete(plan.final, plan.facts, None, [s.run.summary(name) for s in shards]))
        except ValueError as err:
            errors.append(str(err))
        plans[name] = plan
    return plans


# -- writing ----------------------------------------------------------------------------------------
def _row_step(columns) -> int:
    row_bytes = sum(int(np.prod(c.shape[1:], dtype=np.int64)) * (8 if c.is_str else np.dtype(c.stored_dtype).itemsize)
                    for c in columns)
    return max(1, READ_BYTES // max(row_bytes, 1))


def _write(shards: List[Shard], tmp: Path, run_key: dict, merged_from: list, summaries: Dict[str, SummaryPlan]
           ) -> Tuple[int, int]:
    """The merged file: shard 0's provenance and fixed datasets, every shard's rows and skipped
    records in shard order, every attempt, and the summaries combined."""
    first = shards[0].run
    out = MapsFile(tmp, run_key, first.provenance(), dtype=(run_key.get("store") or {}).get("dtype", "float32"),
                   config=_merged_config(first.config), shard="all")
    try:
        out.record_attempts([a for s in shards for a in s.run.attempts()])
        out.record_merged_from(merged_from)
        out.copy_fixed(shards[0].run, sorted(shards[0].fixed))
        for s in shards:
            names = [n for n in s.row_sets if not n.startswith("skipped/")]
            if not s.rows or not names:
                continue
            step = _row_step(s.row_sets[n] for n in names)
            for start in range(0, s.rows, step):
                out.append({n: s.row_sets[n].stored(start, min(start + step, s.rows)) for n in names})
        for s in shards:
            out.append_skipped(s.run.skipped())
        for name, plan in summaries.items():
            out.write_summary(name, plan.final, plan.stats, plan.facts, out.rows)
        return out.rows, out.skipped_rows
    finally:
        out.close()


def _merged_config(text: Optional[str]) -> Optional[str]:
    if text is None:
        return None
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(text)
    if "data" in cfg:
        cfg.data.shard = "all"
    return OmegaConf.to_yaml(cfg)


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


def _check_inputs(dirs: List[Path], out: Path, overwrite: bool) -> None:
    if not dirs:
        raise MergeError("no run dirs given")
    if out.exists() and not overwrite:
        raise MergeError(f"{out} exists; remove it or overwrite it (--force)")
    if out.resolve() in {(d / MAPS).resolve() for d in dirs}:
        raise MergeError(f"{out} is one of the inputs' maps.h5")


def _checked(dirs: List[Path], stack: ExitStack, note: Callable[[str], None]):
    """Open and check the shards: (shards in shard order, completeness checked, summary plans)."""
    errors: List[str] = []
    shards = _open(dirs, stack, errors)
    if errors:
        raise MergeError(_message(errors))
    shards.sort(key=lambda s: s.index)  # stable: repeated shards keep the order given
    check_keys(shards, errors)
    if errors:
        raise MergeError(_message(errors))
    check_shards(shards, errors)
    found: List[str] = []
    checked = check_ids(shards, errors, found)
    check_datasets(shards, errors)
    summaries = plan_summaries(shards, errors, found) if not errors else {}
    if not errors:
        provenance_warnings(shards, found)
    for w in found:
        note(w)
    if errors:
        raise MergeError(_message(errors))
    return shards, checked, summaries


def merge(dirs: Sequence[Path], out: Path, overwrite: bool = False,
          warn: Optional[Callable[[str], None]] = None) -> MergeReport:
    """Merge the maps.h5 of shard run dirs `dirs` into `out`; raises MergeError (nothing written)
    when a check fails. `warn` gets each warning as it is found (they are also in the report)."""
    dirs = [Path(d) for d in dirs]
    _check_out(out)
    out = Path(out)
    _check_inputs(dirs, out, overwrite)
    warnings: List[str] = []

    def note(msg: str) -> None:
        warnings.append(msg)
        if warn:
            warn(msg)

    with ExitStack() as stack:
        shards, checked, summaries = _checked(dirs, stack, note)
        run_key = json.loads(json.dumps(shards[0].run_key))
        run_key.setdefault("data", {})["shard"] = "all"
        merged_from = [{"dir": str(s.dir.resolve()), "shard": s.label, "rows": s.rows,
                        "skipped_rows": s.skipped_rows} for s in shards]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.merging-{os.getpid()}"
        try:
            rows, skipped = _write(shards, tmp, run_key, merged_from, summaries)
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
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
