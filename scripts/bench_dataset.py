"""`python scripts/bench.py --only dataset`: the dataset-level techniques (issue 13) end to end, as
a ratio to the bare no-grad forward pass on the same inputs timed in the same process: each case
runs in a fresh spawned process (the loaded model included), which times the bare forward on (up
to 64 of) its inputs, `run()`s, times the bare forward again (this shared machine's speed drifts
over a minute; the reference is the mean of the two), then reports

* "loop": images/s of the per-input pass (decoder start-up included), as the other figures;
* "all": images/s counting the run-level summary at the end too (the dataset examples' patches,
  cut from the inputs decoded again, and the atlas pages when PNGs are drawn);
* the peak resident memory of the whole process, which must not grow with the number of inputs.

Cases: --n inputs (PNGs drawn as in the other sections), then 256 and 2048 inputs
(`render.png=false`, as a cluster job over a big folder would run)."""
from __future__ import annotations

import multiprocessing as mp
import shutil
from pathlib import Path

from hydra import compose, initialize_config_dir

DATASET = [  # (technique, overrides); skipped when the technique is not registered
    ("dataset_examples", ["technique=dataset_examples", "layers=[blocks.4,bn2]"]),
    ("channel_relevance", ["technique=channel_relevance", "layers=[blocks.4,bn2]"]),
]
MEMORY_AT = (256, 2048)
FORWARD_INPUTS = 64  # the bare forward is timed on this many of the run's inputs (images/s)


def _child(conn, overrides, out, batch_size: int) -> None:
    """In a spawned process: time the bare forward, run once, time it again; send (bare forward
    images/s, the mean of before and after; loop images/s; images/s counting the end-of-run
    summary; peak RSS MiB of the run)."""
    import resource

    from bench import bare_forward  # scripts/bench.py (this process's sys.path is the parent's)
    from pipeline.config import CONF_DIR, register_configs
    from pipeline.runner import resolve_device, run

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    paths = sorted(p for p in Path(cfg.data.path).iterdir() if p.is_file())[:FORWARD_INPUTS]
    device = resolve_device(cfg.device)
    before = bare_forward(cfg, paths, batch_size, device, 2)
    summary = run(cfg, out)
    total = summary.done / (summary.seconds + summary.summary_seconds)  # the patches cut at the end count
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    after = bare_forward(cfg, paths, batch_size, device, 2)
    conn.send(((before + after) / 2, summary.images_per_s, total, rss))
    conn.close()


def in_process(overrides, out, batch_size: int):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, list(overrides), str(out), batch_size))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def dataset_section(common, forward: float, tmp: Path, args, make_inputs) -> None:
    """`forward` (the parent's bare forward) is printed for reference; ratios use each child's own."""
    from pipeline.techniques import REGISTRY

    cases = [(name, extra) for name, extra in DATASET if name in REGISTRY]
    print(f"\n# dataset-level techniques, layers blocks.4 + bn2, all channels; x the bare no-grad forward timed in "
          f"the same process (this process: {forward:.1f} images/s); 'all' counts the run-level summary at the end")
    print(f"{'technique':<20} {'inputs':>6} {'forward':>8} {'loop':>7} {'x fwd':>6} {'all':>7} {'x fwd':>6} "
          f"{'peak MiB':>9}")
    many = tmp / "many"
    make_inputs(many, max(MEMORY_AT))
    folder = [o for o in common if not o.startswith("data.path")] + [f"data.path={many}", "render.png=false"]
    for name, extra in cases:
        settings = [(args.n, common + extra)] + [(n, folder + extra + [f"data.limit={n}"]) for n in MEMORY_AT]
        for n, overrides in settings:
            runs = [in_process(overrides, tmp / "runs" / f"{name}_{n}_{r}", args.batch_size)
                    for r in range(args.repeat if n < max(MEMORY_AT) else 1)]
            best = max(runs, key=lambda r: r[1] / r[0])
            fwd, loop, total, rss = best
            print(f"{name:<20} {n:>6} {fwd:>8.1f} {loop:>7.1f} {loop / fwd:>6.2f} {total:>7.1f} {total / fwd:>6.2f} "
                  f"{max(r[3] for r in runs):>9.0f}", flush=True)
    shutil.rmtree(many, ignore_errors=True)
