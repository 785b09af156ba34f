"""Section "incremental" (issue 16, point 1): occlusion by full inference against incremental
inference (pipeline.techniques.incremental), and against Captum's Occlusion where captum imports
(it is not a dependency), on random-init VGG16 and ResNet-50 and the embedded model, 224 x 224,
window 32, stride 16, fill 0, a batch of --inputs sample photos, max_batch 16 (Captum:
perturbations_per_eval 16). Prints seconds per batch, the speed-ups, the largest relative
difference between our two maps (they must agree to 1e-5) and the FLOP ceiling: the FLOPs of full
inference over those incremental inference runs (torch.utils.flop_counter, one input: its clean
forward and its 169 copies), the most any exact box-wise recomputation can save."""
from __future__ import annotations

import time

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from bench_metrics import sample_batch  # scripts/ beside this file (on sys.path via bench.py)
from pipeline.models import build_model
from pipeline.targets import TargetSpec
from pipeline.techniques import get_technique
from pipeline.techniques.incremental import Incremental
from pipeline.techniques.occlusion import starts

WINDOW, STRIDE, MAX_BATCH = 32, 16, 16


def _seconds(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def flop_ceiling(model, x: torch.Tensor) -> float:
    """FLOPs of the full copies of one input over those of incremental inference on them (its clean
    forward included): what exact incremental inference saves at best, whatever its overheads."""
    edges = starts(x.shape[2], WINDOW, STRIDE)
    ys = torch.tensor([a for a in edges for _ in edges], device=x.device)
    xs = torch.tensor([b for _ in edges for b in edges], device=x.device)
    one = x[:1]
    with torch.no_grad():
        reference = model(one)
        full = _flops(lambda: model(one)) * len(ys)
        engine = Incremental(model)
        incremental = _flops(lambda: list(engine.rows(one, ys, xs, (WINDOW, WINDOW), 0.0, len(ys), MAX_BATCH,
                                                      reference)))
    return full / incremental


def incremental_section(base, device: torch.device, inputs: int = 4) -> None:
    loaded = build_model(base.model, device)
    x = sample_batch(loaded, inputs, device)
    if x.shape[2:] != (224, 224):
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    torch.manual_seed(0)
    models = [("vgg16 (random init)", torchvision.models.vgg16(weights=None)),
              ("resnet50 (random init)", torchvision.models.resnet50(weights=None)),
              ("embedded efficientnet_lite0", loaded.module)]
    try:
        from captum.attr import Occlusion as CaptumOcclusion
    except ImportError:
        CaptumOcclusion = None
        print("captum does not import here: no Captum comparison")
    target = TargetSpec.parse("pred")
    print(f"\n# occlusion, {inputs} inputs 224x224, window {WINDOW} stride {STRIDE}, max_batch {MAX_BATCH}, "
          f"{torch.get_num_threads()} threads on {device}")
    print(f"{'model':<30} {'full s':>8} {'incr. s':>8} {'captum s':>9} {'full/incr':>10} {'captum/incr':>12} {'max rel diff':>13} {'FLOP ceiling':>13}")
    for label, model in models:
        model = model.to(device).eval()

        def ours(incremental):
            technique = get_technique("occlusion")(window=WINDOW, stride=STRIDE, incremental=incremental)
            return technique.attribute(model, x, [], target, max_batch=MAX_BATCH)

        t_full, full = _seconds(lambda: ours(False))
        t_inc, inc = _seconds(lambda: ours(True))
        a, b = inc.maps["input", "drop"], full.maps["input", "drop"]
        diff = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        t_cap = float("nan")
        if CaptumOcclusion is not None:
            occ = CaptumOcclusion(model)
            with torch.no_grad():
                t_cap, _ = _seconds(lambda: occ.attribute(x, sliding_window_shapes=(3, WINDOW, WINDOW),
                                                          strides=(3, STRIDE, STRIDE), baselines=0,
                                                          target=full.targets[:, 0],
                                                          perturbations_per_eval=MAX_BATCH))
        print(f"{label:<30} {t_full:>8.1f} {t_inc:>8.1f} {t_cap:>9.1f} {t_full / t_inc:>10.2f} "
              f"{t_cap / t_inc:>12.2f} {diff:>13.1e} {flop_ceiling(model, x):>13.2f}", flush=True)
