"""Gradient ascent on the input image, and the coarse-to-fine (upscale + blur) schedule.

Only the image parameters get gradients (torch.autograd.grad w.r.t. them, never the model's
parameters); the model is only read, its layers through `pipeline.hooks.capture`.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.featvis import params as P
from pipeline.featvis.objectives import Objective
from pipeline.featvis.transforms import Transform
from pipeline.hooks import capture, forward
from pipeline.progress import NO_PROGRESS, Progress
from pipeline.seeds import keyed_generator

# Named recipes: option overrides. resnet34: the multi-scale recipe (start 56 px, 20 Adam steps at
# lr 0.1, then 12 times: upscale x1.2 and box-blur 5 px, 20 more steps) -> about 500 px images.
PRESETS: Dict[str, Dict[str, object]] = {
    "resnet34": dict(size=56, steps=20, lr=0.1, upscalings=12, upscale_factor=1.2, blur=5, param="pixel"),
}


def with_preset(options, presets: Dict[str, Dict[str, object]]):
    """`options` (a technique's Options dataclass) with its named `preset` applied (the preset's
    values win over the options it sets); an unknown preset raises ValueError listing the known."""
    if options.preset is None:
        return options
    if options.preset not in presets:
        raise ValueError(f"unknown preset {options.preset!r}; known: {', '.join(presets)}")
    return dataclasses.replace(options, **presets[options.preset])


def base_seed(generator: torch.Generator) -> int:
    """One draw from `generator`: the seed that every row's generator is keyed from."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


def row_generators(seed: int, keys: Sequence[Sequence[object]], device: torch.device | str) -> List[torch.Generator]:
    """One generator per row, keyed by what the row makes: row i's generator is seeded by `seed`
    and keys[i] (e.g. (layer, channel) or ("class", c); pipeline.seeds). A channel's image thus
    depends neither on max_batch nor on which other channels are made with it, so filter_vis and
    top_activated's cache make the same image for the same seed, layer, channel and settings."""
    return [keyed_generator(seed, *key, device=device) for key in keys]


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> uint8."""
    return (image.detach().clamp(0, 1) * 255).round().to(torch.uint8)


def normalize(image: torch.Tensor, preprocess) -> torch.Tensor:
    if preprocess is None:
        return image
    mean = torch.tensor(preprocess.mean, dtype=image.dtype, device=image.device)[:, None, None]
    std = torch.tensor(preprocess.std, dtype=image.dtype, device=image.device)[:, None, None]
    return (image - mean) / std


def optimize(model: nn.Module, objective: Objective, param: P.Param, *, steps: int, lr: float,
             transform: Optional[Transform] = None, generators: Sequence[torch.Generator] = (),
             preprocess=None, track: Optional[Objective] = None,
             progress: Progress = NO_PROGRESS, layout: str = "nchw") -> Tuple[torch.Tensor, torch.Tensor]:
    """Maximize `objective` (summed over rows) with Adam on `param` = (params, image_fn).

    `transform` runs on each row with that row's generator (generators[b]) before the model sees
    (pixel - mean) / std. Returns the final image [B, 3, H, W] in [0, 1] (detached) and the tracked
    objective (default: `objective`) at each step [B, steps], evaluated before that step's update.
    `progress.step(B)` after every step (B rows x steps units in all; the caller announces them).
    `layout`: how the objective's layers are read as maps [N, C, h, w] (pipeline.hooks.capture).
    """
    tensors, image_fn = param
    opt = torch.optim.Adam(tensors, lr=lr)
    track = track or objective
    layers = list(dict.fromkeys(objective.layers + track.layers))
    stop = bool(layers) and not (objective.needs_logits or track.needs_logits)  # skip the layers after
    history = []
    with torch.enable_grad(), capture(model, layers, grad=True, stop=stop, layout=layout) as acts:
        for _ in range(steps):
            image = image_fn()  # [B, 3, H, W]
            seen = image
            if transform is not None:
                seen = transform(image, generators)  # row b draws from generators[b]; one batched warp
            logits = forward(model, normalize(seen, preprocess))  # None when stopped after the layers
            value = objective(acts, logits, image)  # [B]
            history.append((value if track is objective else track(acts, logits, image)).detach())
            grads = torch.autograd.grad(-value.sum(), tensors)
            for t, g in zip(tensors, grads):
                t.grad = g
            opt.step()
            for t in tensors:
                t.grad = None
            progress.step(len(history[-1]))
    with torch.no_grad():
        image = image_fn().detach()
    return image, torch.stack(history, 1) if history else image.new_zeros(image.shape[0], 0)


def box_blur(image: torch.Tensor, kernel: int) -> torch.Tensor:
    """Mean over a kernel x kernel window, reflected borders, same size (kernel <= 1: unchanged)."""
    if kernel <= 1:
        return image
    lo, hi = (kernel - 1) // 2, kernel // 2
    return F.avg_pool2d(F.pad(image, (lo, hi, lo, hi), mode="reflect"), kernel, stride=1)


def visualize(model: nn.Module, objective: Objective, *, batch: int, generators: Sequence[torch.Generator],
              device, size: int, steps: int, lr: float, param: str = "fourier", decorrelate: bool = True,
              init_sd: float = 0.01, transform: Optional[Transform] = None, preprocess=None,
              upscalings: int = 0, upscale_factor: float = 1.2, blur: int = 0,
              track: Optional[Objective] = None,
              progress: Progress = NO_PROGRESS, layout: str = "nchw") -> Tuple[torch.Tensor, torch.Tensor]:
    """Initialize `param` (row b from generators[b]), optimize `steps` steps, then `upscalings` times:
    upscale by `upscale_factor` (bicubic), box-blur, re-parameterize and optimize `steps` more.
    Returns images uint8 [B, 3, S, S] and the objective per step [B, steps * (upscalings + 1)].
    `progress.step(batch)` after every step: batch x steps x (upscalings + 1) units, which the
    caller announces (`progress.add`) before it starts."""
    current = P.make(param, batch, size, list(generators), device, decorrelate, init_sd)
    histories = []
    for level in range(upscalings + 1):
        if level:
            size = max(size + 1, round(size * upscale_factor))
            image = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False)
            current = P.from_image(param, box_blur(image.clamp(0, 1), blur), decorrelate)
        image, history = optimize(model, objective, current, steps=steps, lr=lr, transform=transform,
                                  generators=generators, preprocess=preprocess, track=track, progress=progress,
                                  layout=layout)
        histories.append(history)
    return to_uint8(image), torch.cat(histories, 1)
