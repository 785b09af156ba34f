"""`python scripts/bench.py --only dataset`: the dataset-level techniques (issue 13) end to end as a
ratio to the bare no-grad forward pass on the same inputs (their time counts the run-level summary
at the end: the dataset examples' patches, cut from the inputs decoded again), and their peak resident memory at 256
and 2048 inputs, each case in a fresh spawned process (the loaded model included), which must not
grow with the number of inputs."""
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


def _child(conn, overrides, out) -> None:
    """In a spawned process: run once, send (images/s of the per-input loop, images/s counting the
    end-of-run summary too, peak RSS MiB)."""
    import resource

    import torch

    from pipeline.config import CONF_DIR, register_configs
    from pipeline.runner import run

    torch.set_num_threads(2)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    summary = run(cfg, out)
    total = summary.done / (summary.seconds + summary.summary_seconds)  # the patches cut at the end count
    conn.send((summary.images_per_s, total, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    conn.close()


def in_process(overrides, out):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, list(overrides), str(out)))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def dataset_section(common, forward: float, tmp: Path, args, make_inputs) -> None:
    from pipeline.techniques import REGISTRY

    cases = [(name, extra) for name, extra in DATASET if name in REGISTRY]
    print(f"\n# dataset-level techniques, {args.n} inputs, layers blocks.4 + bn2, all channels (x bare forward);"
          " 'all': counting the run-level summary at the end")
    print(f"{'technique':<28} {'loop img/s':>10} {'x forward':>10} {'all img/s':>10} {'x forward':>10}")
    for name, extra in cases:
        runs = [in_process(common + extra, tmp / "runs" / f"{name}_{r}") for r in range(args.repeat)]
        loop, total = max(r[0] for r in runs), max(r[1] for r in runs)
        print(f"{name:<28} {loop:>10.1f} {loop / forward:>10.2f} {total:>10.1f} {total / forward:>10.2f}", flush=True)
    many = tmp / "many"
    make_inputs(many, max(MEMORY_AT))
    folder = [o for o in common if not o.startswith("data.path")] + [f"data.path={many}", "render.png=false"]
    print("\n# peak resident memory (MiB) by inputs, each run in its own process; img/s ('all') at the largest")
    print(f"{'technique':<28}" + "".join(f" {n:>9}" for n in MEMORY_AT) + f" {'all img/s':>10} {'x forward':>10}")
    for name, extra in cases:
        cells, total = [], 0.0
        for n in MEMORY_AT:
            _, total, rss = in_process(folder + extra + [f"data.limit={n}"], tmp / "runs" / f"{name}_mem{n}")
            cells.append(rss)
        print(f"{name:<28}" + "".join(f" {c:>9.0f}" for c in cells) + f" {total:>10.1f} {total / forward:>10.2f}",
              flush=True)
    shutil.rmtree(many, ignore_errors=True)
