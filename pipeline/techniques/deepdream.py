"""DeepDream (Mordvintsev et al. 2015, https://research.google/blog/inceptionism-going-deeper-into-neural-networks/).

Gradient ascent on the input image that amplifies what a layer already sees in it, run coarse to
fine over an octave pyramid; the detail dreamed at one octave is carried to the next.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from pipeline.contracts import Family, Kind, Output, Paper
from pipeline.featvis.optimize import to_uint8
from pipeline.hooks import capture, forward
from pipeline.techniques.base import Technique, chunks, register


class PixelSpace(Technique):
    """Base of techniques that optimize an image in pixel space [0, 1] from each input (Deep Dream,
    inversion): the model's mean/std come from `setup`, and 3D (video) layers are refused."""

    video = False

    def setup(self, model):
        if self.options.mean is None:
            self.options.mean, self.options.std = list(model.preprocess.mean), list(model.preprocess.std)

    def check_layers(self, shapes):
        super().check_layers(shapes)
        for layer, shape in shapes.items():
            refuse_video(self.name, layer, shape)


@register("deepdream")
class DeepDream(PixelSpace):
    """One dream per chosen layer, all inputs of the batch dreamed together (max_batch at a time).

    Objective per input: the mean squared activation of the layer (channel null, the classic L2
    objective), or the mean activation of one channel. The image is optimized in pixel space [0, 1]
    (the model sees (pixel - mean) / std) by normalized gradient ascent: pixel += lr * g / mean|g|,
    each step on a randomly rolled (jittered) image, clamped to [0, 1]. Pyramid: octave i is the
    input shrunk by octave_scale**i (bilinear, octaves at least min_size px); from the smallest up,
    image = base + detail, `steps` ascent steps, detail = image - base, detail upscaled to the next
    base. Returns per layer dream [N, 3, H, W] uint8 and objective [N, octaves * steps] (the value
    before each step). 2D images only: a 3D (video) model is refused.
    """

    family = Family.FEATVIS
    paper = Paper("Mordvintsev et al. 2015", "https://research.google/blog/inceptionism-going-deeper-into-neural-networks/")
    outputs = {"dream": Output(Kind.IMAGE, "[N, 3, H, W]", "uint8"),
               "objective": Output(Kind.DATA, "[N, steps]", doc="the objective before each step of each octave")}

    @dataclass
    class Options:
        channel: Optional[int] = None  # null: amplify the whole layer (mean squared activation)
        octaves: int = 3  # pyramid levels (fewer when a level would be smaller than min_size)
        octave_scale: float = 1.4  # size ratio between successive octaves
        steps: int = 10  # ascent steps per octave
        lr: float = 0.01  # step size in pixel units [0, 1], after dividing the gradient by its mean |g|
        jitter: int = 4  # random roll of up to +-jitter px before each step (0: none)
        min_size: int = 8  # smallest side of an octave, px
        # The model's normalization x = (pixel - mean) / std; null: taken from the model (setup),
        # or, standalone, each input's per-channel [min, max] stands in for the pixel range [0, 1].
        mean: Optional[List[float]] = None
        std: Optional[List[float]] = None

        def __post_init__(self):
            if self.octaves < 1 or self.steps < 1 or self.octave_scale <= 1 or self.lr <= 0 \
                    or self.jitter < 0 or self.min_size < 1 or (self.channel is not None and self.channel < 0):
                raise ValueError("deepdream: octaves, steps, min_size >= 1, octave_scale > 1, lr > 0, "
                                 "jitter >= 0, channel null or >= 0")
            check_mean_std("deepdream", self.mean, self.std)

    def check_layers(self, shapes):
        super().check_layers(shapes)
        for layer, shape in shapes.items():
            if self.options.channel is not None and (len(shape) < 2 or self.options.channel >= shape[1]):
                raise ValueError(f"{self.name}: channel={self.options.channel} but layer {layer!r} "
                                 f"outputs shape {list(shape)}")

    def _attribute(self, p):
        o, x = self.options, p.x  # x [N, 3, H, W]
        require_images(self.name, x)
        a, b = pixel_affine(x, o.mean, o.std)  # model input = a * pixel + b
        pixels = ((x - b) / a).clamp(0, 1)  # [N, 3, H, W]
        maps = {}
        for layer in p.layers:
            dreams, objectives = [], []
            rows = p.input_generators("deepdream", layer)  # each input's jitter keyed by its id
            for s in chunks(x.shape[0], p.max_batch):
                ab = (a if a.shape[0] == 1 else a[s], b if b.shape[0] == 1 else b[s])
                dream, objective = self.dream(p.model, layer, pixels[s], ab, rows[s])
                dreams.append(dream)
                objectives.append(objective)
            maps[layer, "dream"] = to_uint8(torch.cat(dreams))
            maps[layer, "objective"] = torch.cat(objectives)
        return maps

    def objective(self, act: torch.Tensor) -> torch.Tensor:
        """act [N, C, ...] -> [N]."""
        if self.options.channel is None:
            return act.pow(2).flatten(1).mean(1)
        return act[:, self.options.channel].reshape(act.shape[0], -1).mean(1)

    def dream(self, model, layer: str, pixels: torch.Tensor, ab: Tuple[torch.Tensor, torch.Tensor],
              generators: Sequence[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
        """pixels [n, 3, H, W] in [0, 1] -> dreamed pixels [n, 3, H, W], objective [n, octaves * steps]."""
        o = self.options
        bases = [pixels]  # finest first
        for _ in range(o.octaves - 1):
            h, w = (round(d / o.octave_scale) for d in bases[-1].shape[2:])
            if min(h, w) < o.min_size:
                break
            bases.append(F.interpolate(bases[-1], size=(h, w), mode="bilinear", align_corners=False))
        detail = torch.zeros_like(bases[-1])
        values: List[torch.Tensor] = []
        for base in reversed(bases):
            if detail.shape != base.shape:
                detail = F.interpolate(detail, size=base.shape[2:], mode="bilinear", align_corners=False)
            image = (base + detail).clamp(0, 1)
            for _ in range(o.steps):
                image, value = self.ascent_step(model, layer, image, ab, generators)
                values.append(value)
            detail = image - base
        objective = torch.stack(values, 1)  # [n, steps done]
        if objective.shape[1] < o.octaves * o.steps:  # octaves skipped (min_size): pad with NaN
            pad = objective.new_full((objective.shape[0], o.octaves * o.steps - objective.shape[1]), float("nan"))
            objective = torch.cat([pad, objective], 1)
        return image, objective

    def ascent_step(self, model, layer, image, ab, generators):
        """One jittered, normalized gradient-ascent step: -> (image, objective before the step [n]).

        Row b is rolled by a shift drawn from generators[b], so a dream does not depend on the
        inputs it is batched with; the forward pass stops after `layer`."""
        o, (a, b) = self.options, ab
        shifts = [torch.randint(-o.jitter, o.jitter + 1, (2,), generator=g, device=g.device).tolist()
                  if o.jitter else [0, 0] for g in generators]
        rolled = torch.stack([im.roll(tuple(d), (1, 2)) for im, d in zip(image, shifts)]).detach().requires_grad_(True)
        with torch.enable_grad(), capture(model, [layer], grad=True, stop=True) as acts:
            forward(model, a * rolled + b)
            value = self.objective(acts[layer])  # [n]
            (grad,) = torch.autograd.grad(value.sum(), rolled)
        grad = torch.stack([g.roll((-d[0], -d[1]), (1, 2)) for g, d in zip(grad, shifts)])
        grad = grad / grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (image + o.lr * grad).clamp(0, 1).detach(), value.detach()


# -- shared with inversion ----------------------------------------------------------------------
def check_mean_std(name: str, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> None:
    if (mean is None) != (std is None) or (std is not None and (len(mean) != len(std) or min(std) <= 0)):
        raise ValueError(f"{name}: mean and std both null or both given, of equal length, std > 0")


def refuse_video(name: str, layer: str, shape) -> None:
    if len(shape) == 5:
        raise ValueError(f"{name}: layer {layer!r} outputs {list(shape)}: 3D (video) models are not "
                         "supported, only 2D images")


def require_images(name: str, x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name}: needs RGB images [N, 3, H, W], got {list(x.shape)} (no clips)")


def pixel_affine(x: torch.Tensor, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with model input = a * pixel + b, pixel in [0, 1]: a = 1/std, b = -mean/std [1, C, 1, 1];
    mean/std null: each input's per-channel [min, max] maps to [0, 1], a = max - min, b = min [N, C, 1, 1]."""
    if mean is None:
        flat = x.flatten(2)  # [N, C, P]
        lo, hi = flat.amin(2)[..., None, None], flat.amax(2)[..., None, None]
        return (hi - lo).clamp_min(1e-6), lo
    if len(mean) != x.shape[1]:
        raise ValueError(f"{len(mean)} mean/std values for {x.shape[1]} channels")
    m, s = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) for v in (mean, std))
    return 1 / s, -m / s
