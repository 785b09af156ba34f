"""`python scripts/bench.py --only allocator`: what `keep_freed_memory` (pipeline/allocator.py)
buys. Each case runs in a fresh spawned process, since glibc's thresholds cannot be put back once
raised: the bare no-grad forward on decoded batches, and a Grad-CAM run end to end, with glibc's
defaults (keep_freed_memory=false) and with freed memory kept (the default), interleaved
--repeat times; minor page faults counted over the timed part."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from hydra import compose, initialize_config_dir


def _child(conn, overrides, paths, out, batch_size: int) -> None:
    import resource

    from bench import bare_forward  # scripts/bench.py (this process's sys.path is the parent's)
    from pipeline.config import CONF_DIR, register_configs
    from pipeline.runner import resolve_device, run

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    forward = bare_forward(cfg, [Path(p) for p in paths], batch_size, resolve_device(cfg.device), 2)
    forward_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    summary = run(cfg, out)
    conn.send((forward, forward_faults / len(paths), summary.images_per_s))
    conn.close()


def _in_process(overrides, paths, out, batch_size: int):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, list(overrides), [str(p) for p in paths], str(out), batch_size))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def allocator_section(common, paths, tmp: Path, args) -> None:
    print("\n# keep_freed_memory: glibc defaults against freed memory kept, each in a fresh process "
          "(bare forward: images/s and minor page faults per image; Grad-CAM on bn2 end to end)")
    print(f"{'keep_freed_memory':<18} {'repeat':>6} {'forward':>8} {'faults/img':>11} {'gradcam':>8}")
    results = {False: [], True: []}
    for r in range(args.repeat):
        for keep in (False, True):
            overrides = common + ["technique=gradcam", "layers=[bn2]", f"keep_freed_memory={str(keep).lower()}"]
            got = _in_process(overrides, paths, tmp / "runs" / f"alloc_{keep}_{r}", args.batch_size)
            results[keep].append(got)
            print(f"{str(keep).lower():<18} {r:>6} {got[0]:>8.1f} {got[1]:>11.0f} {got[2]:>8.1f}", flush=True)
    best = {k: (max(g[0] for g in v), max(g[2] for g in v)) for k, v in results.items()}
    print(f"kept / defaults (best of {args.repeat}): bare forward {best[True][0] / best[False][0]:.2f}x, "
          f"gradcam end to end {best[True][1] / best[False][1]:.2f}x")
