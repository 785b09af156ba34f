"""Attention maps of ViT-family models: attention rollout (Abnar & Zuidema 2020,
https://arxiv.org/abs/2005.00928) and gradient-weighted attention relevance (Chefer, Gur & Wolf
2021, https://arxiv.org/abs/2103.15679). Both read the attention weights [N, heads, T, T] of
every block (pipeline.attention) and return a map over the patch grid, [N, K, h, w], stored under
the pseudo-layer "attention"; the pipeline upsamples it to the input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from pipeline.attention import attention_maps, check_recorded, refuse_without_attention
from pipeline.contracts import Family, Kind, Output, Paper
from pipeline.layouts import detect, model_grid
from pipeline.techniques.base import Pass, Technique, register, target_scores

ATTENTION = "attention"  # the pseudo-layer name of maps read off the attention weights
HEAD_FUSIONS = ("mean", "max", "min")


class AttentionTechnique(Technique):
    """Shared by the attention techniques: model checks and the class-token row as a grid map."""

    family = Family.ATTENTION
    outputs = {"map": Output(Kind.HEATMAP, "[N, K, h, w]", doc="h x w the patch grid")}
    uses_layers = False
    torchscript = False
    video = False
    attention = True
    grad: bool = False  # needs d score / d attention (timm attention only)

    def check_model(self, model, layers):
        refuse_without_attention(self.name, model, self.grad)
        if model_grid(model)[0] is None:
            raise ValueError(f"{self.name} needs a ViT-family model that states its patch grid and prefix tokens "
                             "(timm `patch_embed.grid_size` and `num_prefix_tokens`, torchvision's VisionTransformer); "
                             f"{type(model).__name__} does not (windowed attention such as Swin is not supported)")

    def attribute(self, model, x, layers, target, **kw):
        if torch.is_tensor(x) and x.dim() != 4:
            raise ValueError(f"{self.name}: expected images [N, C, H, W], got {tuple(x.shape)}; 3D (video) "
                             "models are not supported")
        self.check_model(model, layers)
        return super().attribute(model, x, layers, target, **kw)

    def to_grid(self, p: Pass, R: torch.Tensor) -> torch.Tensor:
        """R [N, T, T] (token-to-token relevance) -> [N, h, w]: the class token's row over the
        patch tokens (with no prefix token, the mean over all rows, what a pooled head reads)."""
        T = R.shape[-1]
        layout = detect((1, T, 1), tuple(p.x.shape[-2:]), p.model, "tokens")
        row = R[:, 0] if layout.prefix else R.mean(1)
        return row[:, layout.prefix:].reshape(R.shape[0], *layout.grid)

    def per_target(self, p: Pass, maps: torch.Tensor) -> torch.Tensor:
        """[N, h, w] -> [N, K, h, w], the same map for every target, in the input's dtype."""
        return maps[:, None].expand(-1, p.targets.shape[1], -1, -1).to(p.x.dtype).contiguous()


def fuse_heads(a: torch.Tensor, how: str) -> torch.Tensor:
    """[N, heads, T, T] -> [N, T, T] by the mean, max or min over heads."""
    if how == "mean":
        return a.mean(1)
    return a.amax(1) if how == "max" else a.amin(1)


def discard_lowest(a: torch.Tensor, ratio: float) -> torch.Tensor:
    """a [N, T, T] with the lowest `ratio` of each row's entries set to 0, the class token's
    column (0) never: floor(ratio * (T - 1)) entries per row among columns 1..T-1."""
    T = a.shape[-1]
    drop = int(ratio * (T - 1))
    if drop <= 0:
        return a
    idx = a[..., 1:].topk(drop, dim=-1, largest=False).indices + 1  # [N, T, drop]
    return a.scatter(-1, idx, 0.0)


def rollout(att: List[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    """The rollout [N, T, T] of per-block attention [N, heads, T, T], first block first: each
    block's fused attention, lowest entries discarded, plus identity, rows renormalised to sum 1;
    R = A_L ... A_2 A_1."""
    R = None
    for a in att:
        a = discard_lowest(fuse_heads(a.float(), head_fusion), discard_ratio)
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        R = a if R is None else a @ R
    return R


@register("attention_rollout")
class AttentionRollout(AttentionTechnique):
    """Attention rollout: the product of the blocks' head-fused attention plus identity (the
    residual), rows renormalised; the class token's row over the patch tokens. Target-independent:
    the same map [N, K, h, w] for each of the K targets. Reads timm ViT / DeiT and torchvision
    VisionTransformer models."""

    paper = Paper("Abnar & Zuidema 2020", "https://arxiv.org/abs/2005.00928")

    @dataclass
    class Options:
        head_fusion: str = "mean"  # mean | max | min over heads
        discard_ratio: float = 0.0  # fraction of each row's lowest entries zeroed (never the class token's)

    def __init__(self, **options):
        super().__init__(**options)
        if self.options.head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion={self.options.head_fusion!r}; expected one of {', '.join(HEAD_FUSIONS)}")
        if not 0.0 <= float(self.options.discard_ratio) < 1.0:
            raise ValueError(f"discard_ratio={self.options.discard_ratio}; expected 0 <= discard_ratio < 1")

    def _attribute(self, p):
        with torch.no_grad(), attention_maps(p.model) as att:
            logits = p.model(p.x)
        check_recorded(att, p.model, p.x.shape[0])
        p.set_logits(logits)
        R = rollout(att, self.options.head_fusion, float(self.options.discard_ratio))
        return {(ATTENTION, "map"): self.per_target(p, self.to_grid(p, R))}


@register("chefer2021")
class Chefer2021(AttentionTechnique):
    """Gradient-weighted attention relevance (Chefer et al. 2021, the generic rule for
    self-attention): R = I; for each block, first to last, Abar = mean over heads of
    relu(dA * A), dA = d(target logit) / d A, and R = R + Abar R; the class token's row over the
    patch tokens, one map per target, [N, K, h, w]. Gradients w.r.t. the attention weights only
    (one forward, one backward per target); timm ViT / DeiT attention only."""

    paper = Paper("Chefer et al. 2021", "https://arxiv.org/abs/2103.15679")
    grad = True

    @dataclass
    class Options:
        pass

    def _attribute(self, p):
        with torch.enable_grad(), attention_maps(p.model, grad=True) as att:
            logits = p.model(p.x)
        check_recorded(att, p.model, p.x.shape[0])
        p.set_logits(logits)
        K = p.targets.shape[1]
        maps = []
        for k in range(K):
            grads = torch.autograd.grad(target_scores(logits, p.targets, k), att, retain_graph=k < K - 1,
                                        allow_unused=True)
            R = None
            for a, g in zip(att, grads):
                a = a.detach().float()
                g = torch.zeros_like(a) if g is None else g.float()
                abar = (g * a).clamp(min=0).mean(1)  # [N, T, T]
                R = torch.eye(a.shape[-1], device=a.device).expand_as(abar) if R is None else R
                R = R + abar @ R
            maps.append(self.to_grid(p, R))
        return {(ATTENTION, "map"): torch.stack(maps, 1).to(p.x.dtype)}
