"""SmoothGrad (Smilkov et al. 2017, https://arxiv.org/abs/1706.03825)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.contracts import Family, Kind, Output, Paper
from pipeline.techniques.base import INPUT, Technique, register


@register("smoothgrad")
class SmoothGrad(Technique):
    """The input gradient averaged over `samples` noisy copies of each input.

    Noise is Gaussian with sigma = noise * (max - min of that input), drawn per input and sample
    from a generator keyed by the run's seed and the input's id (Pass.input_generator); every copy of every input for every target goes through one batched call (at most
    max_batch rows per pass). Returns grad [N, K, C, (T,) H, W] and its max-abs over channels
    maxabs [N, K, (T,) H, W].
    """

    family = Family.ATTRIBUTION
    paper = Paper("Smilkov et al. 2017", "https://arxiv.org/abs/1706.03825")
    outputs = {"grad": Output(Kind.GRADIENT, "[N, K, C, (T,) H, W]"), "maxabs": Output(Kind.HEATMAP, "[N, K, (T,) H, W]", doc="the max-abs over channels")}
    uses_layers = False

    @dataclass
    class Options:
        samples: int = 25  # noisy copies per input
        noise: float = 0.15  # sigma as a fraction of each input's value range (paper: 0.1-0.2)
        squared: bool = False  # average the squared gradients (SmoothGrad-Squared)

        def __post_init__(self):
            if self.samples < 1 or self.noise < 0:
                raise ValueError(f"smoothgrad: samples={self.samples} must be >= 1 and noise={self.noise} >= 0")

    def _attribute(self, p):
        x, targets = p.x, p.targets  # [N, C, *S], [N, K]
        (N, K), S = targets.shape, self.options.samples
        tail = (1,) * (x.dim() - 1)
        sigma = self.options.noise * (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(N, *tail)  # [N, 1, ...]

        def noise(n: int, s: int) -> torch.Tensor:  # [C, *S]: input n's sample s, keyed by its id
            g = p.input_generator(n, "smoothgrad", s)
            return torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)

        # row r = (s * K + k) * N + n: input n with noise sample s, differentiated for target k; the
        # noise depends on (seed, input id, s) only, so neither max_batch nor the batch changes it
        def build(r):
            s_of, k_of, n_of = r // (K * N), (r // N) % K, r % N
            pairs = list(zip(n_of.tolist(), s_of.tolist()))  # (input, sample) of each row
            drawn = {pair: noise(*pair) for pair in dict.fromkeys(pairs)}  # each drawn once per chunk
            eps = torch.stack([drawn[pair] for pair in pairs])
            return x[n_of] + eps * sigma[n_of], targets[n_of, k_of]

        total = torch.zeros((N, K) + x.shape[1:], dtype=x.dtype, device=x.device)
        for r, grads in p.rows_input_grads(S * K * N, build):
            total.index_put_((r % N, (r // N) % K), grads.square() if self.options.squared else grads, accumulate=True)
        grad = total / S  # [N, K, C, *S]
        return {(INPUT, "grad"): grad, (INPUT, "maxabs"): grad.abs().amax(2)}
