"""Average drop and increase in confidence (Chattopadhyay et al. 2018, Grad-CAM++,
https://arxiv.org/abs/1710.11063).

The explanation map E (upsampled bilinearly to the input, min-max normalised to [0, 1] per map; a
constant map becomes 0) multiplies the input: O is the target's softmax probability on E * x, Y on
x. "Multiplied" is in the model's normalised input space: E times the tensor the model is fed, as
torchcam's ClassificationMetric does (a masked pixel becomes 0, the dataset mean colour).
Per input and target: `avg_drop` = 100 * max(0, Y - O) / Y (its mean over a dataset is the
paper's Average Drop %), `increase` = 1 if O > Y else 0 (its mean is the Increase in Confidence).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from pipeline.maps import unit_maps
from pipeline.progress import NO_PROGRESS, Progress
from pipeline.techniques.base import rows_logits


def confidence(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
               max_batch: int, probs: Optional[torch.Tensor] = None,
               progress: Progress = NO_PROGRESS, precision: str = "fp32") -> Dict[str, torch.Tensor]:
    """x [N, C, *S], maps [N, K, *s], targets [N, K] -> {avg_drop, increase: [N, K]}; the N * K
    masked inputs go through the model max_batch at a time. `probs` [N, K] (Y, the target
    probabilities on x) is computed with one more forward of x when not given."""
    N, K = targets.shape
    unit = unit_maps(maps, x.shape[2:])  # [N, K, *S]
    n_of = torch.arange(N, device=x.device).repeat_interleave(K)
    k_of = torch.arange(K, device=x.device).repeat(N)

    def masked(r):  # rows r -> [m, C, *S]
        return x[n_of[r]] * unit[n_of[r], k_of[r]][:, None].to(x.dtype)

    o = torch.empty(N * K, device=x.device)
    for r, logits in rows_logits(model, N * K, masked, max_batch, x.device, progress, precision):
        o[r] = logits.float().softmax(1).gather(1, targets[n_of[r], k_of[r]][:, None])[:, 0]
    o = o.reshape(N, K)
    y = probs.float() if probs is not None else target_probs(model, x, targets, max_batch)
    drop = 100 * (y - o).clamp_min(0) / y.clamp_min(1e-12)
    return {"avg_drop": drop, "increase": (o > y).float()}


def target_probs(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, max_batch: int) -> torch.Tensor:
    """The targets' softmax probabilities on x: [N, K]."""
    out = torch.empty(targets.shape, device=x.device)
    for r, logits in rows_logits(model, x.shape[0], lambda r: x[r], max_batch, x.device):
        out[r] = logits.float().softmax(1).gather(1, targets[r])
    return out
