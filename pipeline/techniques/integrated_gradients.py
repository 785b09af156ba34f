"""Integrated Gradients (Sundararajan et al. 2017, https://arxiv.org/abs/1703.01365)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from pipeline.contracts import Family, Kind, Output, Paper
from pipeline.maps import gaussian_blur
from pipeline.techniques.base import INPUT, Technique, register

BASELINES, METHODS = ("black", "blur", "noise"), ("riemann", "gauss_legendre")
BASELINE_KEY = "integrated_gradients/baseline"  # the purpose the noise baseline is keyed by (Pass.input_generator)


@register("integrated_gradients")
class IntegratedGradients(Technique):
    """(x - b) * integral over a in [0, 1] of d f(b + a (x - b)) / dx, f = the target logit.

    The steps of all inputs for all targets are rows built max_batch at a time (memory bounded by
    max_batch); their weighted gradients are summed as they come. Returns attr [N, K, C, (T,) H, W], its max-abs over channels maxabs [N, K, (T,) H, W],
    and the completeness check per input and target: error [N, K] = sum(attr) - (f(x) - f(b)) and
    rel_error [N, K] = |error| / |f(x) - f(b)|.
    """

    family = Family.ATTRIBUTION
    paper = Paper("Sundararajan et al. 2017", "https://arxiv.org/abs/1703.01365")
    outputs = {"attr": Output(Kind.GRADIENT, "[N, K, C, (T,) H, W]"), "maxabs": Output(Kind.HEATMAP, "[N, K, (T,) H, W]", doc="the max-abs over channels"),
               "error": Output(Kind.DATA, "[N, K]", doc="completeness: sum(attr) - (f(x) - f(baseline))"),
               "rel_error": Output(Kind.DATA, "[N, K]", doc="|error| / |f(x) - f(baseline)|")}
    uses_layers = False

    @dataclass
    class Options:
        steps: int = 32  # gradient evaluations along the path per input and target
        method: str = "riemann"  # riemann (midpoint rule) | gauss_legendre
        baseline: str = "black"  # black | blur | noise
        sigma: float = 8.0  # blur baseline: Gaussian sigma in pixels (each frame blurred alone)
        # The model's input normalisation, x = (pixel - mean) / std with pixels in [0, 1]: black is
        # (0 - mean) / std, noise is uniform over [(0 - mean) / std, (1 - mean) / std]. Null: unknown,
        # each input's own per-channel [min, max] stands in for the pixel range [0, 1].
        mean: Optional[List[float]] = None
        std: Optional[List[float]] = None

        def __post_init__(self):
            if self.steps < 1 or self.method not in METHODS or self.baseline not in BASELINES:
                raise ValueError(f"integrated_gradients: steps={self.steps} must be >= 1, method={self.method!r} "
                                 f"one of {METHODS}, baseline={self.baseline!r} one of {BASELINES}")
            if self.sigma <= 0 or (self.mean is None) != (self.std is None) or (
                    self.std is not None and (len(self.mean) != len(self.std) or min(self.std) <= 0)):
                raise ValueError("integrated_gradients: sigma must be > 0; mean and std both null or "
                                 "both given, of equal length, std > 0")

    def setup(self, model):
        """Black and noise baselines in the model's own normalisation, unless given."""
        if self.options.mean is None:
            self.options.mean, self.options.std = list(model.preprocess.mean), list(model.preprocess.std)

    def _attribute(self, p):
        o = self.options
        x, targets = p.x, p.targets  # [N, C, *S], [N, K]
        (N, K), tail = targets.shape, (1,) * (x.dim() - 1)
        base = baseline(x, o.baseline, o.sigma, o.mean, o.std, p.input_generators(BASELINE_KEY))  # [N, C, *S]
        alphas, weights = nodes(o.method, o.steps, x)  # [M], [M]
        M = alphas.numel()
        # row r = ((k * M) + m) * N + n: input n on path point m, differentiated for target k
        k_of = lambda r: r // (M * N)  # noqa: E731
        m_of, n_of = (lambda r: (r // N) % M), (lambda r: r % N)  # noqa: E731

        def build(r):
            a = alphas[m_of(r)].view(-1, *tail)
            return base[n_of(r)] + a * (x[n_of(r)] - base[n_of(r)]), targets[n_of(r), k_of(r)]

        total = torch.zeros((N, K) + x.shape[1:], dtype=x.dtype, device=x.device)  # sum_m w_m grad_m
        for r, grads in p.rows_input_grads(K * M * N, build):
            total.index_put_((n_of(r), k_of(r)), weights[m_of(r)].view(-1, *tail) * grads, accumulate=True)
        attr = (x - base)[:, None] * total  # [N, K, C, *S]
        f_x = p.logits.gather(1, targets)  # [N, K]
        f_b = torch.empty_like(f_x)
        for r, logits in p.rows_logits(N, lambda r: base[r]):
            f_b[r] = logits.gather(1, targets[r])
        error = attr.flatten(2).sum(2) - (f_x - f_b)
        return {(INPUT, "attr"): attr, (INPUT, "maxabs"): attr.abs().amax(2), (INPUT, "error"): error,
                (INPUT, "rel_error"): error.abs() / (f_x - f_b).abs().clamp_min(1e-12)}


def nodes(method: str, steps: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quadrature on [0, 1]: points a [steps] and weights w [steps], sum w = 1.

    riemann: the midpoint rule, a = (i + 1/2) / steps, w = 1 / steps (exact for a linear path
    function, no endpoint evaluated); gauss_legendre: Legendre nodes mapped from [-1, 1]."""
    if method == "riemann":
        a, w = (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    else:
        t, w = np.polynomial.legendre.leggauss(steps)
        a, w = (t + 1) / 2, w / 2
    return (torch.as_tensor(a, dtype=like.dtype, device=like.device),
            torch.as_tensor(w, dtype=like.dtype, device=like.device))


def baseline(x: torch.Tensor, kind: str, sigma: float, mean: Optional[List[float]],
             std: Optional[List[float]], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """The baseline b [N, C, *S] for x [N, C, *S] (see Options for black and noise); input n's
    noise comes from generators[n]."""
    if kind == "blur":
        return gaussian_blur(x, sigma)
    if mean is None:  # each input's per-channel range stands in for the pixel range [0, 1]
        flat = x.flatten(2)  # [N, C, P]
        shape = x.shape[:2] + (1,) * (x.dim() - 2)
        lo, hi = flat.amin(2).view(shape), flat.amax(2).view(shape)
    else:
        if len(mean) != x.shape[1]:
            raise ValueError(f"integrated_gradients: {len(mean)} mean/std values for {x.shape[1]} channels")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        m, s = (torch.tensor(v, dtype=x.dtype, device=x.device).view(shape) for v in (mean, std))
        lo, hi = (0 - m) / s, (1 - m) / s
    if kind == "black":
        return lo.expand_as(x).clone()
    u = torch.stack([torch.rand(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generators])
    return lo + u * (hi - lo)
