"""`python -m pipeline.reproduce RUN_DIR [--out DIR] [--tol 1e-5] [--device cpu]`: re-run a run from
the config recorded in its maps.h5 into a new dir and compare the two files dataset by dataset.

Rows are matched by input id. For each dataset the largest absolute difference is printed (strings,
ids and skipped reasons must be equal: a mismatch counts as infinite); the exit code is 1 when one
exceeds --tol or a dataset is missing on one side, 0 when all agree, 2 when the run cannot be re-run.

A run file can come from someone else: a recorded `model.arch=package.module:Class` (a checkpoint
model) would import that module and call that class, so it is refused (exit code 2, naming the
import) unless --trust-code is given.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from omegaconf import OmegaConf

from pipeline.config import Config, ConfigError, register_configs
from pipeline.store import MAPS, open_run

EXCLUDE = ("id",)  # the key rows are matched on


def recorded_config(run_dir: Path):
    """The resolved config stored in run_dir/maps.h5, typed by the schema."""
    path = run_dir / MAPS
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no maps.h5")
    try:
        with open_run(path) as f:
            text = f.config
    except OSError as err:
        raise ConfigError(f"{path} cannot be read ({err})") from None
    if not text:
        raise ConfigError(f"{path} records no config")
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.dtype == object or b.dtype == object or a.dtype.kind in "US" or b.dtype.kind in "US":
        return 0.0 if np.array_equal(a, b) else float("inf")
    if a.size == 0:
        return 0.0
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    both_nan = np.isnan(a64) & np.isnan(b64)
    diff = np.where(both_nan, 0.0, np.abs(a64 - b64))
    return float(np.nan_to_num(diff, nan=np.inf).max())


def compare(a_path: Path, b_path: Path) -> List[Tuple[str, float, str]]:
    """[(dataset, max |a - b|, note)] for every dataset in either file; rows matched by id."""
    out: List[Tuple[str, float, str]] = []
    with open_run(a_path) as fa, open_run(b_path) as fb:
        da, db = fa.columns(), fb.columns()
        ids_a, ids_b = fa.ids(), fb.ids()
        if sorted(ids_a) != sorted(ids_b):
            only = sorted(set(ids_a) ^ set(ids_b))
            out.append(("id", float("inf"), f"inputs differ: {only[:10]}"))
        pos_b = {i: k for k, i in enumerate(ids_b)}
        order_a = np.array([k for k, i in enumerate(ids_a) if i in pos_b], dtype=np.int64)
        order_b = np.array([pos_b[i] for i in ids_a if i in pos_b], dtype=np.int64)
        for name in sorted(set(da) | set(db)):
            if name in EXCLUDE:
                continue
            if name not in da or name not in db:
                out.append((name, float("inf"), "only in the " + ("original" if name in da else "reproduction")))
                continue
            a, b = da[name], db[name]
            if name.startswith("skipped/"):
                same = sorted(map(str, a.read())) == sorted(map(str, b.read()))
                out.append((name, 0.0 if same else float("inf"), "as a set"))
            elif a.is_rows:
                va, vb = np.asarray(a.read()), np.asarray(b.read())
                out.append((name, _difference(va[order_a] if len(order_a) else va[:0],
                                              vb[order_b] if len(order_b) else vb[:0]), ""))
            else:
                out.append((name, _difference(np.asarray(a.read()), np.asarray(b.read())), ""))
    return out


def code_imports(cfg) -> List[str]:
    """What re-running `cfg` would import and call as Python code: its model family's `imports`
    hook (pipeline.families: a checkpoint's `model.arch=package.module:Class`). Technique and data
    keys name nothing importable."""
    from pipeline.families import code_imports as model_imports

    return model_imports(cfg.model)


def reproduce(run_dir: Path, out_dir: Optional[Path] = None, device: Optional[str] = None,
              trust_code: bool = False):
    """Re-run run_dir's recorded config into out_dir; returns (out_dir, comparison). A config that
    imports Python code (`code_imports`) raises ConfigError, before any work, unless trust_code."""
    from pipeline.runner import run

    cfg = recorded_config(run_dir)
    try:
        imports = code_imports(cfg)
    except Exception as err:  # noqa: BLE001 - e.g. an interpolation that does not resolve
        raise ConfigError(f"{run_dir / 'maps.h5'}: the recorded config cannot be read ({err})") from None
    if imports and not trust_code:
        raise ConfigError(f"{run_dir / 'maps.h5'} records code to run: {'; '.join(imports)}. "
                          "Re-run with --trust-code if you trust that code")
    for line in imports:
        print(f"--trust-code: {line}", file=sys.stderr)
    if device is not None:
        cfg.device = device
    out_dir = out_dir or run_dir.parent / f"{run_dir.name}.reproduce-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out_dir / "maps.h5").exists():
        raise ConfigError(f"{out_dir} already holds a maps.h5; choose a new --out")
    run(cfg, out_dir)
    return out_dir, compare(run_dir / "maps.h5", out_dir / "maps.h5")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="new run dir (default: <run_dir>.reproduce-<time>)")
    parser.add_argument("--tol", type=float, default=1e-5, help="largest absolute difference allowed")
    parser.add_argument("--device", default=None, help="run on this device instead of the recorded one")
    parser.add_argument("--trust-code", action="store_true",
                        help="allow a recorded model.arch=package.module:Class to be imported and called")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    register_configs()
    try:
        out_dir, rows = reproduce(args.run_dir, args.out, args.device, trust_code=args.trust_code)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    width = max([len(name) for name, _, _ in rows] + [7])
    print(f"# {args.run_dir} vs {out_dir} (tolerance {args.tol:g})")
    print(f"{'dataset':<{width}}  {'max |diff|':>12}  status")
    bad = 0
    for name, diff, note in rows:
        ok = diff <= args.tol
        bad += not ok
        print(f"{name:<{width}}  {diff:>12.3g}  {'ok' if ok else 'DIFFERS'}{'  ' + note if note else ''}")
    print(f"{len(rows) - bad} of {len(rows)} datasets agree" + (f"; {bad} differ" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
