"""Representation inversion (Mahendran & Vedaldi 2015, https://arxiv.org/abs/1412.0035)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from pipeline.contracts import Family, Kind, Output, Paper
from pipeline.hooks import capture, forward
from pipeline.featvis.optimize import to_uint8
from pipeline.techniques.base import chunks, register
from pipeline.techniques.deepdream import PixelSpace, check_mean_std, pixel_affine, require_images


@register("inversion")
class Inversion(PixelSpace):
    """Per input and chosen layer, an image whose representation matches the input's.

    Minimizes over pixels p in [0, 1], from uniform noise in [0.4, 0.6] (keyed per input: Pass.input_generator):
      ||Φ(x(p)) - Φ0||² / ||Φ0||²  +  tv_weight · mean (dx² + dy²)^(β/2)  +  alpha_weight · mean |2p - 1|^α
    with x(p) = (p - mean) / std the model input, Φ0 the layer's output on the input, the TV and
    α-norm terms over the image mapped to [-1, 1] (u = 2p - 1), Adam on p (β 0.9, 0.999, written
    out: no torch.optim), clamped to [0, 1] after each step. One optimization per chosen layer (a layer sweep shows detail fading with depth),
    all inputs together (max_batch at a time; Adam is per element, so each input's result does not
    depend on the others). Returns per layer image [N, 3, H, W] uint8 and loss [N, steps], the
    normalized representation loss before each step. 2D images only: a 3D (video) model is refused.
    """

    family = Family.FEATVIS
    paper = Paper("Mahendran & Vedaldi 2015", "https://arxiv.org/abs/1412.0035")
    outputs = {"image": Output(Kind.IMAGE, "[N, 3, H, W]", "uint8"),
               "loss": Output(Kind.DATA, "[N, steps]", doc="the normalized representation loss before each step")}

    @dataclass
    class Options:
        steps: int = 100  # Adam steps per layer (200-500 for sharper results on real models)
        lr: float = 0.05  # Adam step size, pixel units [0, 1]
        tv_weight: float = 0.05  # λ_tv
        beta: float = 2.0  # TV exponent β
        alpha_weight: float = 0.01  # λ_α
        alpha: float = 6.0  # α-norm exponent
        # The model's normalization x = (pixel - mean) / std; null: taken from the model (setup),
        # or, standalone, each input's per-channel [min, max] stands in for the pixel range [0, 1].
        mean: Optional[List[float]] = None
        std: Optional[List[float]] = None

        def __post_init__(self):
            if self.steps < 1 or self.lr <= 0 or self.tv_weight < 0 or self.alpha_weight < 0 \
                    or self.beta < 1 or self.alpha < 1:
                raise ValueError("inversion: steps >= 1, lr > 0, tv_weight, alpha_weight >= 0, beta, alpha >= 1")
            check_mean_std("inversion", self.mean, self.std)


    def _attribute(self, p):
        o, x = self.options, p.x  # x [N, 3, H, W]
        require_images(self.name, x)
        a, b = pixel_affine(x, o.mean, o.std)  # model input = a * pixel + b
        init = 0.4 + 0.2 * torch.stack([torch.rand(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                                        for g in p.input_generators("inversion/init")])  # keyed per input
        maps = {}
        for layer in p.layers:
            target = p.activations()[layer]  # Φ0 [N, ...]
            images, losses = [], []
            for s in chunks(x.shape[0], p.max_batch):
                ab = (a if a.shape[0] == 1 else a[s], b if b.shape[0] == 1 else b[s])
                image, loss = self.invert(p.model, layer, target[s], init[s], ab)
                images.append(image)
                losses.append(loss)
            maps[layer, "image"] = to_uint8(torch.cat(images))
            maps[layer, "loss"] = torch.cat(losses)
        return maps

    def invert(self, model, layer, target, init, ab):
        """target Φ0 [n, ...], init pixels [n, 3, H, W] -> pixels [n, 3, H, W], loss [n, steps]."""
        o, (a, b) = self.options, ab
        norm = target.pow(2).flatten(1).sum(1).clamp_min(1e-12)  # ||Φ0||² [n]
        pixels = init.clone()
        m, v = torch.zeros_like(pixels), torch.zeros_like(pixels)  # Adam moments (β1 0.9, β2 0.999)
        losses = []
        for t in range(1, o.steps + 1):
            pixels.requires_grad_(True)
            with torch.enable_grad(), capture(model, [layer], grad=True, stop=True) as acts:
                forward(model, a * pixels + b)  # stops after the layer: the rest is not needed
                rep = (acts[layer] - target).pow(2).flatten(1).sum(1) / norm  # [n]
                u = 2 * pixels - 1
                total = rep + o.tv_weight * tv(u, o.beta) + o.alpha_weight * u.abs().pow(o.alpha).flatten(1).mean(1)
                (grad,) = torch.autograd.grad(total.sum(), pixels)
            m.mul_(0.9).add_(grad, alpha=0.1)
            v.mul_(0.999).addcmul_(grad, grad, value=0.001)
            step = (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
            pixels = (pixels.detach() - o.lr * step).clamp(0, 1)
            losses.append(rep.detach())
        return pixels.detach(), torch.stack(losses, 1)


def tv(u: torch.Tensor, beta: float) -> torch.Tensor:
    """Total variation [n] of u [n, C, H, W]: mean over pixels of (dx² + dy²)^(β/2) (forward differences)."""
    dx = u[..., :-1, 1:] - u[..., :-1, :-1]
    dy = u[..., 1:, :-1] - u[..., :-1, :-1]
    return (dx.pow(2) + dy.pow(2)).clamp_min(1e-12).pow(beta / 2).flatten(1).mean(1)
