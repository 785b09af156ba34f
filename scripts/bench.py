"""Throughput of each technique end to end, as a ratio to a bare no-grad forward pass.

    python scripts/bench.py [--n 64] [--batch-size 16] [--device auto] [--repeat 2]

All runs happen in this one process on the same inputs: the bundled sample photos copied to
--n files. The bare forward pass times only `model(x)` under no_grad on batches already decoded
and preprocessed. Each end-to-end run is `pipeline.runner.run` (DataLoader decode -> maps ->
HDF5 + PNG, PNGs for the first 8 inputs) and counts from the first batch to the writer's close.
Each figure is the best of --repeat runs (this machine is shared; timings are noisy).
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

from pipeline.config import CONF_DIR, register_configs
from pipeline.data import SAMPLES_DIR, prepare
from pipeline.models import build_model
from pipeline.runner import resolve_device, run

CASES = [  # (label, overrides)
    ("activations (blocks.4, bn2)", ["technique=activations", "layers=[blocks.4,bn2]"]),
    ("saliency", ["technique=saliency"]),
    ("gradcam 1 layer (bn2)", ["technique=gradcam", "layers=[bn2]"]),
    ("gradcam 3 layers (blocks.5, blocks.6, bn2)", ["technique=gradcam", "layers=[blocks.5,blocks.6,bn2]"]),
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="number of input images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)

    register_configs()
    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    try:
        paths = make_inputs(tmp / "images", args.n)
        common = [f"data=folder", f"data.path={tmp / 'images'}", f"batch_size={args.batch_size}",
                  f"device={args.device}", f"num_workers={args.num_workers}", "render.max_inputs=8"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            base = compose(config_name="config", overrides=common)
            forward = bare_forward(base, paths, args.batch_size, device, args.repeat)
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
            print(f"# {args.n} images, batch {args.batch_size}, {name}, torch {torch.__version__}")
            print(f"{'case':<46} {'images/s':>9} {'x forward':>10}")
            print(f"{'bare no-grad forward (model only)':<46} {forward:>9.1f} {1.0:>10.2f}")
            results = {}
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
