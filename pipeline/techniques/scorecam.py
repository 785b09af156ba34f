"""Score-CAM (Wang et al. 2020, https://arxiv.org/abs/1910.01279), and the base of the CAMs that
need no gradient (Score-CAM, Ablation-CAM, Eigen-CAM)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from pipeline.contracts import Paper
from pipeline.maps import unit_maps
from pipeline.techniques.base import ACTS, Pass, register
from pipeline.techniques.gradcam import CAM


class ForwardCAM(CAM):
    """A CAM from the layers' activations (and extra no-grad forwards), no gradient: subclasses
    override `layer_cam(p, layer, acts [N, C, *S]) -> [N, K, *S]`."""

    needs = frozenset({ACTS})

    def layer_cam(self, p: Pass, layer: str, acts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def channel_scores(p: Pass, acts: torch.Tensor, top: Optional[int],
                   inputs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Target logits of one model input per (input n, kept channel c), all K targets read off the
    same row's logits.

    The kept channels are the `top` of highest mean activation per input (all when None).
    `inputs(n, c)` builds the rows [m, ...] for index tensors n, c [m]; rows are built and run
    max_batch at a time (bounded memory), so M = N*C' rows cost ceil(M / max_batch) forwards,
    whatever the number of targets. Returns scores [N, K, C'] and kept channel ids [N, C'].
    """
    N = acts.shape[0]
    kept = top_kept(acts, top)  # [N, C']
    Ck = kept.shape[1]
    scores = torch.empty(N * Ck, p.targets.shape[1], device=acts.device)  # row r = n * C' + j
    for r, logits in p.rows_logits(N * Ck, lambda r: inputs(r // Ck, kept[r // Ck, r % Ck])):
        scores[r] = logits.gather(1, p.targets[r // Ck]).to(scores.dtype)
    return scores.view(N, Ck, -1).transpose(1, 2), kept


def top_kept(acts: torch.Tensor, top: Optional[int]) -> torch.Tensor:
    """acts [N, C, *S] -> ids [N, C'] of the `top` channels of highest mean activation (all: None)."""
    C = acts.shape[1]
    return acts.flatten(2).mean(2).topk(min(top or C, C), dim=1).indices


def weighted_sum(acts: torch.Tensor, weights: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """sum_c weights[n, k, c] * acts[n, kept[n, c]]: acts [N, C, *S], weights [N, K, C'] -> [N, K, *S]."""
    chosen = acts[torch.arange(acts.shape[0], device=acts.device)[:, None], kept]  # [N, C', *S]
    return torch.einsum("nkc,nc...->nk...", weights.to(chosen.dtype), chosen)


@register("scorecam")
class ScoreCAM(ForwardCAM):
    """Each channel's map, upsampled to the input and min-max scaled to [0, 1], masks the input;
    the channel weights are the softmax over channels of the masked inputs' target logits, as in
    the paper (its score increases over a baseline differ from these by one constant per input
    and target, which the softmax cancels). Returns cam [N, K, *S].
    """

    paper = Paper("Wang et al. 2020", "https://arxiv.org/abs/1910.01279")

    @dataclass
    class Options(CAM.Options):
        top_channels: Optional[int] = None  # only the channels of highest mean activation (null: all)

        def __post_init__(self):
            if self.top_channels is not None and self.top_channels < 1:
                raise ValueError(f"scorecam: top_channels={self.top_channels} must be >= 1 (or null)")

    def layer_cam(self, p, layer, acts):
        x = p.x

        def masked(n, c):  # [m] -> x[n] * normalised upsampled acts[n, c]  [m, C_in, *S_in]
            return x[n] * unit_maps(acts[n, c].unsqueeze(1), x.shape[2:]).to(x.dtype)  # [m, 1, *S_in]

        scores, kept = channel_scores(p, acts, self.options.top_channels, masked)
        return weighted_sum(acts, scores.softmax(-1), kept)
