"""Section "peers" (issue 16): every technique a peer library also has, side by side in one process.

    python scripts/bench.py --only peers [--peers-batch 8] [--repeat 3]

The project's technique (`Technique.attribute`, the maps only: no decoding, HDF5 or PNG) against
Captum, pytorch-grad-cam and torchcam on the same batch, the same model and layer and the same
target classes (the predicted ones), on two architectures: the embedded EfficientNet-Lite0 (real
weights) and torchvision ResNet-18 (random weights: timing only). Repetitions are interleaved
(ours, peer a, peer b, ours, ...) so that a slow spell of this shared machine hits every
implementation alike; each figure is the median images/s over --repeat repetitions, and the
ratio is ours / the peer's. Settings that differ between libraries are matched where each lets
them be set (batches of 16 rows for masks, steps and perturbations; IG 32 steps; SmoothGrad 25
samples, noise 0.15; occlusion 32 x 32 windows, stride 16, zero baseline). A peer that is not
installed is left out with a line saying so (`pip install -e '.[peers]'` installs all three; they
are never dependencies of the pipeline).

numpy's, scipy's and OpenCV's OpenBLAS thread pools are limited to one thread for the section
(threadpoolctl, in the peers extra): after a multithreaded BLAS call (pytorch-grad-cam's numpy SVD
in Eigen-CAM) their threads spin for a while, and on 2 cores that slowed whichever torch call came
next by ~2x (measured: ours 60 -> 145 ms interleaved after it). Torch's own threads are untouched;
the peers lose nothing (pytorch-grad-cam's Eigen-CAM gets faster: it was slowed by its own spin).
"""
from __future__ import annotations

import copy
import statistics
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Tuple

import torch

from bench_metrics import sample_batch  # scripts/ beside this file (on sys.path via bench.py)
from pipeline.models import build_model
from pipeline.targets import TargetSpec
from pipeline.techniques import get_technique

ROWS = 16  # rows per forward for masks, steps and perturbations, in every library


def _peer(name: str):
    try:
        if name == "captum":
            import captum.attr as mod
        elif name == "pytorch-grad-cam":
            import pytorch_grad_cam as mod
        else:
            import torchcam.methods as mod
        return mod
    except Exception as err:  # not installed: its columns are left out
        print(f"{name}: not importable here ({type(err).__name__}: {err}); its rows are left out")
        return None


def ours(name: str, layer: str, **options) -> Callable:
    technique = get_technique(name)(**options)
    return lambda model, x, t: technique.attribute(model, x, [layer], TargetSpec.parse("pred"), max_batch=ROWS)


def captum_fns(captum, layer_module) -> Dict[str, Callable]:
    def call(cls, **kw):
        def fn(model, x, t):
            return cls(model).attribute(x, target=t, **kw)
        return fn

    def noise_tunnel(model, x, t):
        return captum.NoiseTunnel(captum.Saliency(model)).attribute(
            x, target=t, nt_type="smoothgrad", nt_samples=25, nt_samples_batch_size=ROWS, stdevs=0.15)

    return {
        "gradcam": lambda model, x, t: captum.LayerGradCam(model, layer_module(model)).attribute(x, target=t),
        "guided_gradcam": lambda model, x, t: captum.GuidedGradCam(model, layer_module(model)).attribute(x, target=t),
        "saliency": call(captum.Saliency, abs=True),
        "guided_backprop": call(captum.GuidedBackprop),
        "deconvnet": call(captum.Deconvolution),
        "gradxinput": call(captum.InputXGradient),
        "integrated_gradients": call(captum.IntegratedGradients, n_steps=32, internal_batch_size=ROWS),
        "smoothgrad": noise_tunnel,
        "occlusion": call(captum.Occlusion, sliding_window_shapes=(3, 32, 32), strides=(3, 16, 16), baselines=0,
                          perturbations_per_eval=ROWS),
    }


def gradcam_fns(gc, layer_module) -> Dict[str, Callable]:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    def cam(cls, **kw):
        def fn(model, x, t):  # frozen parameters: its layer gradients need an input that needs grad
            with cls(model=model, target_layers=[layer_module(model)], **kw) as method:
                return method(input_tensor=x.detach().requires_grad_(True), targets=[ClassifierOutputTarget(int(c)) for c in t])
        return fn

    copies: Dict[int, torch.nn.Module] = {}

    def guided(model, x, t):  # one input per call (its API); it swaps the model's nn.ReLU modules: on a copy
        from pytorch_grad_cam import GuidedBackpropReLUModel

        if id(model) not in copies:
            copies[id(model)] = copy.deepcopy(model)
        gb = GuidedBackpropReLUModel(model=copies[id(model)], device=x.device)
        return [gb(x[n:n + 1].detach().clone(), target_category=int(c)) for n, c in enumerate(t)]

    return {"guided_backprop": guided,
            "gradcam": cam(gc.GradCAM), "gradcampp": cam(gc.GradCAMPlusPlus), "xgradcam": cam(gc.XGradCAM),
            "layercam": cam(gc.LayerCAM), "eigencam": cam(gc.EigenCAM),
            "scorecam": cam(gc.ScoreCAM), "ablationcam": cam(gc.AblationCAM, batch_size=ROWS)}


def torchcam_fns(tc, layer: str) -> Dict[str, Callable]:
    def cam(cls, **kw):
        def fn(model, x, t):  # torchcam reads layer gradients off a backward from the scores: the input must need grad
            with cls(model, target_layer=layer, **kw) as extractor:
                scores = model(x.detach().requires_grad_(True))
                return extractor(class_idx=[int(c) for c in t], scores=scores)
        return fn

    return {"gradcam": cam(tc.GradCAM), "gradcampp": cam(tc.GradCAMpp), "xgradcam": cam(tc.XGradCAM),
            "layercam": cam(tc.LayerCAM), "scorecam": cam(tc.ScoreCAM, batch_size=ROWS)}


def architectures(base, device, n: int):
    import torchvision

    loaded = build_model(base.model, device)
    x = sample_batch(loaded, n, device)
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval().to(device)
    for p in resnet.parameters():
        p.requires_grad_(False)
    # CAM layers: the last stage of each (320 and 512 channels: Score-/Ablation-CAM run one row per channel)
    return [("EfficientNet-Lite0", loaded.module, "blocks.6", x), ("ResNet-18", resnet, "layer4", x)]


def median_rate(fn: Callable, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def row(name: str, impls: List[Tuple[str, Callable]], model, x, targets, repeat: int) -> Dict[str, float]:
    """{implementation: median images/s} over `repeat` interleaved rounds after one untimed
    warm-up round; a failing implementation is reported and left out."""
    rates: Dict[str, List[float]] = {label: [] for label, _ in impls}
    failed = set()
    for rep in range(repeat + 1):
        for label, fn in impls:  # interleaved
            if label in failed:
                continue
            try:
                rate = median_rate(lambda: fn(model, x, targets), x.shape[0])
            except Exception as err:
                print(f"  {name} / {label}: failed ({type(err).__name__}: {str(err)[:120]})")
                failed.add(label)
                continue
            if rep:
                rates[label].append(rate)
    return {label: statistics.median(r) for label, r in rates.items() if r and label not in failed}


def print_row(name: str, medians: Dict[str, float], libraries) -> None:
    mine = medians.get("ours", float("nan"))
    cells = [f"{medians[lib]:>10.2f} ({mine / medians[lib]:>5.2f}x)".rjust(26) if lib in medians else f"{'-':>26}"
             for lib in libraries]
    print(f"{name:<22} {mine:>8.2f} " + " ".join(cells), flush=True)


def one_blas_thread():
    """numpy / scipy / OpenCV OpenBLAS pools at one thread (see the module docstring), when
    threadpoolctl imports."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("threadpoolctl does not import: OpenBLAS pools left as they are (their spin can slow the next call)")
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def peers_section(base, device, batch: int = 8, repeat: int = 3, names: Optional[List[str]] = None) -> None:
    with one_blas_thread():
        _peers_section(base, device, batch, repeat, names)


def _peers_section(base, device, batch: int, repeat: int, names: Optional[List[str]]) -> None:
    captum, gc, tc = _peer("captum"), _peer("pytorch-grad-cam"), _peer("torchcam")
    for arch, model, layer, x in architectures(base, device, batch):
        module = lambda m, layer=layer: m.get_submodule(layer)  # noqa: E731
        with torch.no_grad():
            targets = model(x).argmax(1)
        libraries: Dict[str, Dict[str, Callable]] = {}
        if captum:
            libraries["Captum"] = captum_fns(captum, module)
        if gc:
            libraries["pytorch-grad-cam"] = gradcam_fns(gc, module)
        if tc:
            libraries["torchcam"] = torchcam_fns(tc, layer)
        settings = {"integrated_gradients": {"steps": 32}, "smoothgrad": {"samples": 25, "noise": 0.15},
                    "occlusion": {"window": 32, "stride": 16}}
        known = {t for fns in libraries.values() for t in fns}
        techniques = sorted(known & set(names) if names else known)
        print(f"\n# peers on {arch} ({layer} for the CAMs), batch {batch}, {x.shape[-1]} px, "
              f"median of {repeat}, images/s (ratio = ours / peer)")
        print(f"{'technique':<22} {'ours':>8} " + " ".join(f"{lib:>26}" for lib in libraries))
        for name in techniques:
            impls = [("ours", ours(name, layer, **settings.get(name, {})))]
            impls += [(lib, fns[name]) for lib, fns in libraries.items() if name in fns]
            print_row(name, row(name, impls, model, x, targets, repeat), libraries)
        if gc and arch == "EfficientNet-Lite0" and (not names or "ablationcam" in names):
            # Ablation-CAM at the last conv layer (conv_head, 1280 channels: 1280 ablated copies per
            # input), one input, against pytorch-grad-cam's, whose copies each run the whole network
            last = lambda m: m.conv_head  # noqa: E731
            impls = [("ours", ours("ablationcam", "conv_head")),
                     ("pytorch-grad-cam", gradcam_fns(gc, last)["ablationcam"])]
            print_row("ablationcam conv_head", row("ablationcam", impls, model, x[:1], targets[:1], repeat),
                      libraries)
