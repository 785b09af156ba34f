"""Eigen-CAM (Muhammad & Yeasin 2020, https://arxiv.org/abs/2008.00299)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.contracts import Paper
from pipeline.techniques.base import register
from pipeline.techniques.gradcam import CAM
from pipeline.techniques.scorecam import ForwardCAM


def orient(v: torch.Tensor, X: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """The sign of each principal direction v [N, C] (an SVD gives either): the one that makes the
    map X v [N, P] agree with the activation energy [N, P], sum_p energy_p (X v)_p >= 0 (on a tie,
    the sign that makes v's first nonzero entry positive). v and -v give the same result."""
    agree = torch.einsum("npc,nc,np->n", X, v, energy)  # [N]
    first = v.gather(1, (v != 0).float().argmax(1, keepdim=True))[:, 0]  # first nonzero entry
    flip = (agree < 0) | ((agree == 0) & (first < 0))
    return torch.where(flip[:, None], -v, v)


@register("eigencam")
class EigenCAM(ForwardCAM):
    """The activations [positions x channels] of each input projected on their first principal
    direction (first right singular vector). Target-independent: the same map for each of the K
    targets. Returns cam [N, K, *S].

    Sign rule: a principal direction has no sign of its own, so it is oriented to agree with the
    activation energy, the L2 norm of the activation vector at each position e_p = |A_p|: the sign
    makes sum_p e_p * map_p >= 0, i.e. v has a nonnegative inner product with the energy-weighted
    sum of the activation vectors, sum_p e_p A_p. The map is then positive somewhere (unless it is zero everywhere), so relu never
    wipes it out, also on layers with signed activations (block outputs without an activation,
    where the channel-sum rule could leave a map <= 0 everywhere). For nonnegative activations
    (after a ReLU) the first direction is one-signed and this is the usual choice, v >= 0.
    With center=true the same rule uses the centred projection (the energy of the raw activations)."""

    paper = Paper("Muhammad & Yeasin 2020", "https://arxiv.org/abs/2008.00299")

    @dataclass
    class Options(CAM.Options):
        center: bool = False  # subtract each channel's mean first (pytorch-grad-cam's variant)

    def layer_cam(self, p, layer, acts):
        X = acts.float().flatten(2).transpose(1, 2)  # [N, P, C]
        energy = X.norm(dim=2)  # [N, P] the activation energy at each position
        if self.options.center:
            X = X - X.mean(1, keepdim=True)
        v = orient(torch.linalg.svd(X, full_matrices=False).Vh[:, 0], X, energy)  # [N, C]
        cam = (X @ v[..., None]).view(acts.shape[0], 1, *acts.shape[2:])  # [N, 1, *S]
        return cam.repeat(1, p.targets.shape[1], *[1] * (acts.dim() - 2))
