"""Section "metrics" (issue 14): our batched ROAD, confidence and sparseness on one batch of Grad-CAM
maps (bn2) of the embedded model, against Quantus's ROAD and Sparseness on the same maps when
quantus imports (it is not a dependency). Prints seconds per batch and model forwards used."""
from __future__ import annotations

import time

import cv2
import numpy as np
import torch

from pipeline.data import SAMPLES_DIR, prepare
from pipeline.metrics.confidence import confidence, target_probs
from pipeline.metrics.road import auto_solver, impute, ranks, removal_masks, road
from pipeline.metrics.pointing import box_mask, energy_pointing, pointing_game
from pipeline.metrics.sparseness import gini
from pipeline.models import build_model
from pipeline.targets import TargetSpec
from pipeline.techniques import get_technique

PERCENTAGES = list(range(10, 100, 10))


class Counting(torch.nn.Module):
    """The model, counting the rows it is fed."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.model(x)


def sample_batch(loaded, n: int, device) -> torch.Tensor:
    """The bundled sample photos, cycled to n, prepared as the model's input [n, 3, S, S] on device."""
    samples = sorted(SAMPLES_DIR.glob("*.jpg"))
    return torch.stack([prepare(cv2.cvtColor(cv2.imread(str(samples[i % len(samples)])), cv2.COLOR_BGR2RGB),
                                None, loaded.preprocess)[0] for i in range(n)]).to(device)


def batch_and_maps(base, device, n: int):
    loaded = build_model(base.model, device)
    x = sample_batch(loaded, n, device)
    result = get_technique("gradcam")().attribute(loaded.module, x, ["bn2"], TargetSpec.parse("pred"))
    return loaded.module, x, result.maps["bn2", "cam"].detach(), result.targets


def timed(label: str, model: Counting, fn, n: int):
    """Run fn once, print its seconds and the rows fed to model; returns (seconds, fn's value)."""
    model.rows = 0
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    print(f"{label:<46} {seconds:>9.2f} {model.rows:>9d} {seconds / n * 16:>12.2f}", flush=True)
    return seconds, value


def quantus_imputation(xb: np.ndarray, maps_hw: np.ndarray, m: int, n: int) -> None:
    """Quantus's noisy linear imputation (a sparse direct solve per image and percentage) on the
    first m inputs, the same MoRF pixels as ours (the top p% of the upsampled map), scaled to n."""
    from quantus.functions.perturb_func import noisy_linear_imputation

    start = time.perf_counter()
    for x_element, a in zip(xb[:m], maps_hw[:m]):
        order = np.argsort(-a.reshape(-1), kind="stable")
        for p in PERCENTAGES:
            noisy_linear_imputation(arr=x_element, indices=order[: round(p * order.size / 100)], noise=0.01)
    seconds = (time.perf_counter() - start) * n / m
    print(f"{'quantus: imputation only, MoRF (from ' + str(m) + ' inputs)':<46} {seconds:>9.2f} {0:>9d} "
          f"{seconds / n * 16:>12.2f}", flush=True)


def ours_imputation(x: torch.Tensor, maps: torch.Tensor, max_batch: int, order: str = "morf",
                    solver: str = "auto") -> float:
    """Our imputation alone on the same pixels (MoRF: as Quantus's): all inputs x percentages,
    max_batch rows at a time, with `solver` (pipeline.metrics.road.impute); returns the seconds."""
    H, W = x.shape[2:]
    removed = removal_masks(ranks(maps, (H, W))[:, 0], PERCENTAGES, order).reshape(-1, H, W)  # [N * P, H, W]
    rows = x.repeat_interleave(len(PERCENTAGES), 0)
    start = time.perf_counter()
    for i in range(0, len(rows), max_batch):
        impute(rows[i:i + max_batch], removed[i:i + max_batch], solver=solver)
    seconds = time.perf_counter() - start
    label = f"ours: imputation only, {order.upper()}" + ("" if solver == "auto" else f", {solver} solver")
    print(f"{label:<46} {seconds:>9.2f} {0:>9d} "
          f"{seconds / x.shape[0] * 16:>12.2f}", flush=True)
    return seconds


def road_forwards(model: Counting, x: torch.Tensor, max_batch: int) -> float:
    """ROAD's forwards alone: as many rows as ROAD feeds (inputs x percentages x 2 orders), max_batch
    at a time, no imputation; returns the seconds."""
    model.rows = 0
    rows = x.repeat_interleave(2 * len(PERCENTAGES), 0)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(rows), max_batch):
            model(rows[i:i + max_batch])
    seconds = time.perf_counter() - start
    print(f"{'ours: ROAD forwards alone (no imputation)':<46} {seconds:>9.2f} {model.rows:>9d} "
          f"{seconds / x.shape[0] * 16:>12.2f}", flush=True)
    return seconds


def metrics_section(base, device, n: int = 16, max_batch: int = 16) -> None:  # a run's default: batch_size
    model, x, maps, targets = batch_and_maps(base, device, n)
    counted = Counting(model).eval()
    print(f"\n# metrics on {n} Grad-CAM maps (bn2) at {tuple(x.shape[2:])}, max_batch {max_batch}")
    print(f"{'metric':<46} {'seconds':>9} {'forwards':>9} {'s / 16 inputs':>12}")
    whole, _ = timed(f"ours: ROAD MoRF+LeRF, {len(PERCENTAGES)} percentages", counted,
                  lambda: road(counted, x, maps, targets, PERCENTAGES, max_batch), n)
    forwards = road_forwards(counted, x, max_batch)
    imputation = sum(ours_imputation(x, maps, max_batch, order) for order in ("morf", "lerf"))
    solver = auto_solver(x.device)
    print(f"ROAD ({solver} solver): imputation (both orders) / its forwards = {imputation / forwards:.2f}; "
          f"everything but the forwards (imputation, noise, masks) / its forwards = {whole / forwards - 1:.2f}")
    if solver != "torch":
        ours_imputation(x, maps, max_batch, "morf", solver="torch")  # the fallback where no C compiler is found
    probs = target_probs(model, x, targets, max_batch)  # a run has them from its own forward
    timed("ours: average drop + increase", counted,
          lambda: confidence(counted, x, maps, targets, max_batch, probs), n)
    _, ours_gini = timed("ours: sparseness (Gini)", counted, lambda: gini(maps, x.shape[2:]), n)
    H, W = x.shape[2:]
    boxes = [[np.array([[W / 4, H / 4, W / 2, H / 2]])] for _ in range(n)]  # one centred box per input
    timed("ours: pointing game + energy pointing", counted,
          lambda: (pointing_game(maps, boxes, (H, W), 15), energy_pointing(maps, boxes, (H, W))), n)
    try:
        import quantus
    except Exception as err:  # not a dependency
        print(f"quantus: not importable here ({type(err).__name__}: {err}); its rows are left out")
        return
    xb = x.cpu().numpy()
    yb = targets[:, 0].cpu().numpy()
    ab = torch.nn.functional.interpolate(maps.float(), size=x.shape[2:], mode="bilinear",
                                         align_corners=False)[:, 0].cpu().numpy()[:, None]
    road_q = quantus.ROAD(noise=0.01, percentages=PERCENTAGES, display_progressbar=False)
    try:
        timed(f"quantus: ROAD (MoRF), {len(PERCENTAGES)} percentages", counted,
              lambda: road_q(model=counted, x_batch=xb, y_batch=yb, a_batch=ab, device=str(device)), n)
    except Exception as err:  # quantus 0.6.0 on RGB inputs: it ranks C*H*W attributions, imputes over H*W
        print(f"quantus: ROAD fails on these {tuple(xb.shape[1:])} inputs ({type(err).__name__}: {err}); "
              "its imputation timed alone instead (against ours, MoRF, above):")
        quantus_imputation(xb, ab[:, 0], min(n, 4), n)
    sb = box_mask(boxes[0][0], (H, W))[None, None].repeat(n, 0)  # [n, 1, H, W]
    pointing_q = quantus.PointingGame(display_progressbar=False)
    _, hits = timed("quantus: PointingGame (no tolerance)", counted,
                    lambda: pointing_q(model=counted, x_batch=xb, y_batch=yb, a_batch=ab, s_batch=sb,
                                       device=str(device)), n)
    hits = np.asarray(hits)
    ours_hits = pointing_game(maps, boxes, (H, W), 0).numpy()[:, 0]
    print(f"pointing game (tolerance 0), ours vs Quantus: {int((hits.astype(float) == ours_hits).sum())} of {n} agree")
    sparse_q = quantus.Sparseness(display_progressbar=False)
    _, theirs = timed("quantus: Sparseness", counted,
                      lambda: sparse_q(model=counted, x_batch=xb, y_batch=yb, a_batch=ab, device=str(device)), n)
    ours, theirs = ours_gini.cpu().numpy()[:, 0], np.asarray(theirs)
    print(f"Gini, ours vs Quantus: max difference {np.abs(ours - theirs).max():.2e}")
