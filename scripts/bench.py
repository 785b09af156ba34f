"""Throughput of each technique end to end, as a ratio to a bare no-grad forward pass.

    python scripts/bench.py [--n 64] [--batch-size 16] [--device auto] [--repeat 2] [--only foundation|techniques|comparisons|featvis|rf|sweep|dataset|metrics|allocator|incremental|peers]

All runs happen in this one process on the same inputs: the bundled sample photos copied to
--n files. The bare forward pass times only `model(x)` under no_grad on batches already decoded
and preprocessed. Each end-to-end run is `pipeline.runner.run` (DataLoader decode -> maps ->
HDF5 + PNG, PNGs for the first 8 inputs) and counts from the first batch to the writer's close.
Each figure is the best of --repeat runs (this machine is shared; timings are noisy).

Section "rf" (issue 5): receptive-field maps for every layer of torchvision MobileNetV2 (random
weights: timing only) at 224 x 224 up to features.18, for a batch of --batch-size crops, against
one no-grad forward pass of the model on a batch of as many images.

Section "sweep" (issue 6): `python -m pipeline -m` over 3 layers x 2 techniques on the sample photos
with the basic launcher and with hydra/launcher=submitit_local; wall time, the jobs' own compute
time and how long after the command each job started computing.

Section "allocator": the bare forward and a Grad-CAM run with glibc's allocator defaults against
keep_freed_memory=true (scripts/bench_allocator.py), each in a fresh process.

Section "dataset" (issue 13, scripts/bench_dataset.py): dataset_examples and channel_relevance end
to end on --n inputs, and their peak resident memory at 256 and 2048 inputs.

Section "peers" (issue 16, scripts/bench_peers.py): every technique a peer also has, against
Captum, pytorch-grad-cam and torchcam in this one process, interleaved repetitions, medians.

Section "metrics" (issue 14, scripts/bench_metrics.py): ROAD, confidence and sparseness on one batch
of Grad-CAM maps, against Quantus where it imports.

Section "incremental" (issue 16, scripts/bench_incremental.py): occlusion by full against incremental
inference (and Captum's Occlusion where it imports) on VGG16, ResNet-50 and the embedded model.

Section "featvis" (issue 4): filter_vis for all channels of blocks.4, batched against one channel
at a time.

Section "techniques" (issue 3; `--only comparisons` skips its table): every registered technique end to end on --n-small inputs (one
layer, bn2; the costly ones with the settings named in the table); Integrated Gradients with 32
steps against 32 x saliency on one batch; Score-CAM with its masks batched (max_batch=64) against
one mask at a time (max_batch=1); four CAM methods on three layers in one run against Grad-CAM
alone on the same layers.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch
from hydra import compose, initialize_config_dir

from pipeline.allocator import keep_freed_memory
from pipeline.config import CONF_DIR, ConfigError, register_configs
from pipeline.data import SAMPLES_DIR, prepare
from pipeline.models import build_model
from pipeline.runner import plan, resolve_device, run
from pipeline.techniques import REGISTRY

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_allocator import allocator_section  # noqa: E402 - scripts/ beside this file
from bench_dataset import dataset_section  # noqa: E402
from bench_incremental import incremental_section  # noqa: E402
from bench_metrics import metrics_section  # noqa: E402
from bench_peers import peers_section  # noqa: E402

THREE = "layers=[blocks.5,blocks.6,bn2]"
CASES = [  # (label, overrides)
    ("activations (blocks.4, bn2)", ["technique=activations", "layers=[blocks.4,bn2]"]),
    ("saliency", ["technique=saliency"]),
    ("gradcam 1 layer (bn2)", ["technique=gradcam", "layers=[bn2]"]),
    ("gradcam 3 layers (blocks.5, blocks.6, bn2)", ["technique=gradcam", THREE]),
]


def make_inputs(folder: Path, n: int) -> list:
    samples = sorted(SAMPLES_DIR.glob("*.jpg"))
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        src = samples[i % len(samples)]
        dst = folder / f"{i:04d}_{src.name}"
        shutil.copy(src, dst)
        paths.append(dst)
    return paths


def bare_forward(cfg, paths, batch_size: int, device: torch.device, repeat: int) -> float:
    """images/s of `model(x)` alone on decoded batches, under the allocator setting the runs use
    (cfg.keep_freed_memory, as `run()` sets it), so that every ratio compares like with like."""
    if cfg.keep_freed_memory:
        keep_freed_memory()
    loaded = build_model(cfg.model, device)
    xs = [prepare(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), None, loaded.preprocess)[0] for p in paths]
    batches = [torch.stack(xs[i : i + batch_size]).to(device) for i in range(0, len(xs), batch_size)]
    best = float("inf")
    with torch.no_grad():
        loaded.module(batches[0])  # warm-up
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for b in batches:
                loaded.module(b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return len(paths) / best


SLOW = {  # technique -> overrides that keep its row of the table to seconds on a CPU
    "scorecam": ["technique.scorecam.top_channels=64"],
    "ablationcam": ["technique.ablationcam.top_channels=64"],
    "occlusion": ["technique.occlusion.window=56", "technique.occlusion.stride=56"],
}


LAYERS = {"kernels": "layers=[conv_head]"}  # technique -> its layer, where bn2 is not one it can take


def best_run(cfg, out: Path, repeat: int) -> float:
    return max(run(cfg, out / str(r)).images_per_s for r in range(repeat))


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def techniques_section(common, forward: float, tmp: Path, args) -> None:
    if args.only != "comparisons":
        technique_table(common, forward, tmp, args)
    if not args.names:
        comparisons(common, tmp, args)


def technique_table(common, forward: float, tmp: Path, args) -> None:
    small = [o for o in common if not o.startswith("data.path")] + [f"data.path={tmp / 'small'}"]
    print(f"\n# every technique end to end, {args.n_small} inputs, layer bn2 (x bare forward)")
    print(f"{'technique':<46} {'images/s':>9} {'x forward':>10}")
    names = args.names.split(",") if args.names else sorted(REGISTRY)
    for name in names:
        extra = SLOW.get(name, [])
        cfg = compose(config_name="config", overrides=small + [f"technique={name}", LAYERS.get(name, "layers=[bn2]")] + extra)
        try:
            ips = best_run(cfg, tmp / "runs" / name, 1)
        except ConfigError as err:  # a technique this table's settings do not fit: named, the table goes on
            print(f"{name:<46} {'n/a':>9} {'':>10}  ({err})", flush=True)
            continue
        label = name + (f" ({', '.join(e.split('.')[-1] for e in extra)})" if extra else "")
        print(f"{label:<46} {ips:>9.2f} {ips / forward:>10.3f}", flush=True)


def comparisons(common, tmp: Path, args) -> None:
    # IG (32 steps) against 32 saliency passes, on one batch, maps only
    cfg = compose(config_name="config", overrides=common + ["technique=[saliency,integrated_gradients]",
                                                            "technique.integrated_gradients.steps=32"])
    p = plan(cfg)
    x = torch.stack([prepare(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB), None, p.model.preprocess)[0]
                     for f in sorted((tmp / "images").iterdir())[: args.batch_size]]).to(p.device)

    def attribute(name):
        t = p.techniques[name]
        return lambda: t.attribute(p.model.module, x, ["bn2"], p.target, max_batch=cfg.max_batch)

    sal = timed(attribute("saliency"), args.repeat)
    ig = timed(attribute("integrated_gradients"), args.repeat)
    print(f"\nintegrated_gradients 32 steps: {ig:.2f} s vs saliency {sal:.3f} s on {len(x)} inputs -> "
          f"{ig / (32 * sal):.2f} x (32 x saliency); target <= 1.2")

    from pipeline.techniques import get_technique

    score = get_technique("scorecam")(top_channels=32)
    one_input = x[:2]
    batched = timed(lambda: score.attribute(p.model.module, one_input, ["bn2"], p.target, max_batch=cfg.max_batch), args.repeat)
    single = timed(lambda: score.attribute(p.model.module, one_input, ["bn2"], p.target, max_batch=1), args.repeat)
    print(f"scorecam, 2 inputs x 32 masks: batched (max_batch={cfg.max_batch}) {batched:.2f} s, one mask at a time "
          f"{single:.2f} s -> {single / batched:.2f}x faster batched")

    four = compose(config_name="config", overrides=common + ["technique=[gradcam,gradcampp,xgradcam,layercam]", THREE])
    one = compose(config_name="config", overrides=common + ["technique=gradcam", THREE])
    t4, t1 = best_run(four, tmp / "runs" / "four", args.repeat), best_run(one, tmp / "runs" / "one", args.repeat)
    print(f"four CAM methods on three layers in one run: {t4:.1f} images/s vs Grad-CAM alone {t1:.1f} -> "
          f"{t1 / t4:.2f}x the time of one Grad-CAM run; target <= 1.3")


def _filter_vis_child(conn, model_cfg, layer, channels, max_batch, device) -> None:
    """Runs in its own (spawned) process: time and peak resident memory of one filter_vis generate()."""
    import resource

    from omegaconf import OmegaConf

    from pipeline.techniques import get_technique

    torch.set_num_threads(2)
    loaded = build_model(OmegaConf.create(model_cfg), device)

    technique = get_technique("filter_vis")(channels=channels, size=64, steps=16)
    start = time.perf_counter()
    out = technique.generate(loaded.module, [layer], device=device, generator=torch.Generator().manual_seed(0),
                             max_batch=max_batch, preprocess=loaded.preprocess)
    conn.send((time.perf_counter() - start, out[layer, "images"].shape[0],
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    conn.close()


def featvis_section(base, device: torch.device, layer: str = "blocks.4") -> None:
    """filter_vis on one layer: all channels batched vs one channel at a time, and peak memory
    (each case in a fresh spawned process: its peak RSS, the loaded model included) for channel
    counts at a fixed max_batch and for max_batch values at a fixed channel count."""
    import multiprocessing as mp

    from omegaconf import OmegaConf

    model_cfg = OmegaConf.to_container(base.model, resolve=True)
    ctx = mp.get_context("spawn")

    def case(channels, max_batch):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_filter_vis_child, args=(child, model_cfg, layer, channels, max_batch, device))
        proc.start()
        result = parent.recv()
        proc.join()
        return result

    print(f"\n# filter_vis on {layer} (64 px, 16 steps); each case in its own process")
    print(f"{'channels':>9} {'max_batch':>10} {'seconds':>9} {'peak RSS MiB':>13}")
    results = {}
    for channels, max_batch in (("all", base.max_batch), ("all", 1), ("0-31", base.max_batch),
                                ("all", 4 * base.max_batch)):
        seconds, n, rss = case(channels, max_batch)
        results[channels, max_batch] = seconds
        print(f"{n:>9} {max_batch:>10} {seconds:>9.1f} {rss:>13.0f}", flush=True)
    for max_batch in (base.max_batch, 4 * base.max_batch):
        print(f"all channels batched (max_batch={max_batch}) vs one at a time: "
              f"{results['all', 1] / results['all', max_batch]:.1f}x faster; target >= 5")


def rf_section(args, device: torch.device) -> None:
    """Receptive-field maps of all MobileNetV2 layers for a batch of crops, x one forward pass."""
    import torchvision

    from pipeline.targets import TargetSpec
    from pipeline.techniques import get_technique

    model = torchvision.models.mobilenet_v2(weights=None).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    B, layer = args.batch_size, "features.18"
    x = torch.randn(B, 3, 224, 224, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            model(x)
        sync()

    base = timed(forward, 5)
    g = torch.Generator().manual_seed(0)
    crops = [[int(v) for v in torch.randint(0, 160, (2,), generator=g)] + [64, 64] for _ in range(B)]
    print(f"\n# receptive fields: MobileNetV2, 224 x 224, every layer up to {layer}, {B} crops "
          f"(x one forward pass of {B} images, {base * 1000:.1f} ms)")
    print(f"{'case':<46} {'ms':>9} {'x forward':>10}")
    for name in ("rf_forward", "rf_ratio", "rf_backward"):
        t = get_technique(name)(crop=crops if name != "rf_backward" else [[3, 3, 1, 1]] * B)
        t.prepare(model, [layer], x[:1])

        def compute():
            t.compute(device)
            sync()

        seconds = timed(compute, 5)
        print(f"{name + f' ({len(t.drawn)} layers)':<46} {seconds * 1000:>9.1f} {seconds / base:>10.2f}", flush=True)
    erf = get_technique("erf")()

    def effective():
        erf.attribute(model, x, [layer], TargetSpec.parse("pred"))
        sync()

    seconds = timed(effective, 3)
    print(f"{'erf (' + layer + ', ' + str(B) + ' images)':<46} {seconds * 1000:>9.1f} {seconds / base:>10.2f}", flush=True)


def sweep_section(args) -> None:
    """The same multirun (3 layers x 2 techniques on the sample photos) with Hydra's basic launcher
    (jobs one after another in one process) and with submitit_local (each job its own process)."""
    import json
    import subprocess

    import h5py

    overrides = ["technique=gradcam,activations", "layers=[blocks.4],[blocks.5],[bn2]", f"device={args.device}",
                 f"num_workers={args.num_workers}"]
    print("\n# sweep: 3 layers x 2 techniques on the 4 sample photos, wall time of `python -m pipeline -m ...`")
    print(f"{'launcher':<16} {'wall s':>8} {'jobs':>5} {'sum of job compute s':>21} {'mean job start s':>17}")
    walls = {}
    for launcher in ("basic", "submitit_local"):
        sweep = Path(tempfile.mkdtemp(prefix=f"pipeline-sweep-{launcher}-"))
        cmd = [sys.executable, "-m", "pipeline", "-m", f"hydra/launcher={launcher}", *overrides, f"hydra.sweep.dir={sweep}"]
        start = time.time()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.time() - start
        walls[launcher] = wall
        compute, starts = 0.0, []
        for maps in sorted(sweep.glob("*/maps.h5")):
            with h5py.File(maps, "r") as f:
                attempt = json.loads(f.attrs["attempts"])[-1]
            compute += attempt["seconds"]
            starts.append(attempt["unix_time"] - start)
        print(f"{launcher:<16} {wall:>8.1f} {len(starts):>5} {compute:>21.1f} {sum(starts) / len(starts):>17.1f}", flush=True)
        shutil.rmtree(sweep, ignore_errors=True)
    extra = (walls["submitit_local"] - walls["basic"]) / 6
    print(f"submitit_local costs {extra:+.1f} s per job against the basic launcher "
          f"({walls['submitit_local'] / walls['basic']:.2f}x the wall time)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="number of input images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--n-small", type=int, default=16, help="inputs per technique in the techniques table")
    parser.add_argument("--names", default=None, help="techniques and peers tables: only these (comma-separated)")
    parser.add_argument("--peers-batch", type=int, default=8, help="inputs per call in the peers table")
    parser.add_argument("--only", choices=["foundation", "techniques", "comparisons", "featvis", "rf", "sweep", "dataset",
                                           "metrics", "allocator", "incremental", "peers"],
                        default=None)
    args = parser.parse_args(argv)

    register_configs()
    if args.only == "sweep":
        sweep_section(args)
        return
    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    try:
        paths = make_inputs(tmp / "images", args.n)
        make_inputs(tmp / "small", args.n_small)
        common = ["data=folder", f"data.path={tmp / 'images'}", f"batch_size={args.batch_size}",
                  f"device={args.device}", f"num_workers={args.num_workers}", "render.max_inputs=8"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            base = compose(config_name="config", overrides=common)
            forward = bare_forward(base, paths, args.batch_size, device, args.repeat)
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
            print(f"# {args.n} images, batch {args.batch_size}, {name}, torch {torch.__version__}")
            print(f"{'case':<46} {'images/s':>9} {'x forward':>10}")
            print(f"{'bare no-grad forward (model only)':<46} {forward:>9.1f} {1.0:>10.2f}")
            results = {}
            if args.only == "featvis":
                featvis_section(base, device)
                return
            if args.only == "rf":
                rf_section(args, device)
                return
            if args.only in ("techniques", "comparisons"):
                techniques_section(common, forward, tmp, args)
                return
            if args.only == "allocator":
                allocator_section(common, paths, tmp, args)
                return
            if args.only == "peers":
                peers_section(base, device, args.peers_batch, args.repeat, args.names.split(",") if args.names else None)
                return
            if args.only == "metrics":
                metrics_section(base, device, args.batch_size)
                return
            if args.only == "incremental":
                incremental_section(base, device)
                return
            if args.only == "dataset":
                dataset_section(common, forward, tmp, args, make_inputs)
                return
            for label, overrides in CASES:
                cfg = compose(config_name="config", overrides=common + overrides)
                best = 0.0
                for r in range(args.repeat):
                    summary = run(cfg, tmp / "runs" / f"{len(results)}_{r}")
                    best = max(best, summary.images_per_s)
                results[label] = best
                print(f"{label + ' (end to end)':<46} {best:>9.1f} {best / forward:>10.2f}", flush=True)
            one, three = results[CASES[2][0]], results[CASES[3][0]]
            print(f"gradcam: 3 layers cost {one / three:.2f}x one layer; 3 layers end to end reach "
                  f"{three / forward:.2f}x the bare forward pass")
            if args.only is None:
                techniques_section(common, forward, tmp, args)
                featvis_section(base, device)
                rf_section(args, device)
                dataset_section(common, forward, tmp, args, make_inputs)
                incremental_section(base, device)
                sweep_section(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
