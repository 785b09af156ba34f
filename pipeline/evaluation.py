"""Evaluating maps in the same run (`evaluate.*` keys), on the batch the maps were made from.

- Deletion / insertion (Petsiuk et al. 2018, https://arxiv.org/abs/1806.07421): pixels (voxels for
  clips) are ranked by the map; deletion replaces the top-ranked ones with the baseline in
  `steps` equal parts, insertion puts them into the baseline image; the curve is the target's
  softmax probability after each part, [steps + 1], and its AUC the curve's trapezoid mean.
  All perturbed copies of all inputs go through the model together, `max_batch` rows at a time.
- Model-randomization sanity check (Adebayo et al. 2018, https://arxiv.org/abs/1810.03292):
  the layers with parameters are re-initialized from the top down, cascading, in `sanity_steps`
  cumulative groups, on a private copy of the model; after each group the maps are recomputed
  for the same targets and compared with the originals by Spearman rank correlation, [steps].

Only `Kind.HEATMAP` outputs (one map per target) are evaluated. Results are extra columns of maps.h5
(`<technique>/<layer>/<output>.deletion`, `.deletion_auc`, `.insertion`, `.insertion_auc`,
`.sanity`), and `plots.write_plots` draws their means at the end of a run.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pipeline.contracts import Kind
from pipeline.maps import gaussian_blur, resize_maps
from pipeline.progress import NO_PROGRESS, Progress
from pipeline.techniques.base import Pass, Technique, rows_logits

Key = Tuple[str, str, str]  # (technique, layer, output)


def heatmaps(techniques: Dict[str, Technique], maps: Dict[Key, torch.Tensor]) -> Dict[Key, torch.Tensor]:
    """The per-target maps [N, K, *S] among a batch's outputs."""
    return {key: m for key, m in maps.items() if key[2] in techniques[key[0]].outputs_of(Kind.HEATMAP)}


def deletion_insertion(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                       steps: int, max_batch: int, kinds: Sequence[str] = ("deletion", "insertion"),
                       progress: Progress = NO_PROGRESS, precision: str = "fp32") -> Dict[str, torch.Tensor]:
    """x [N, C, *S], maps [N, K, *s], targets [N, K] -> curves [N, K, steps+1] and AUCs [N, K]
    for each of `kinds`.

    Deletion goes from x to zeros (the dataset mean colour, in model space); insertion from a
    blurred x to x. Perturbed copies are built max_batch rows at a time, never all at once;
    `progress` counts them.
    """
    N, K = targets.shape
    spatial = x.shape[2:]
    maps = resize_maps(maps.float(), spatial).reshape(N, K, -1)  # [N, K, P]
    P = maps.shape[-1]
    order = maps.argsort(dim=-1, descending=True)  # [N, K, P] most important first
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(P, device=x.device).expand(N, K, P))  # position of each pixel
    counts = torch.linspace(0, P, steps + 1, device=x.device).round().long()  # [steps+1] pixels changed
    rows = N * K * (steps + 1)
    n_of = torch.arange(N, device=x.device).repeat_interleave(K * (steps + 1))  # [rows]
    k_of = torch.arange(K, device=x.device).repeat_interleave(steps + 1).repeat(N)
    s_of = torch.arange(steps + 1, device=x.device).repeat(N * K)
    out = {}
    ends = {"deletion": lambda: (x, torch.zeros_like(x)), "insertion": lambda: (gaussian_blur(x, 5.0), x)}
    progress.add(rows * len(kinds))
    for name in kinds:
        start, end = ends[name]()

        def mixed(r, start=start, end=end):  # rows r -> [m, C, *S]
            changed = (rank[n_of[r], k_of[r]] < counts[s_of[r], None]).reshape(-1, 1, *spatial).to(x.dtype)
            return start[n_of[r]] * (1 - changed) + end[n_of[r]] * changed

        curve = torch.empty(rows, device=x.device)
        for r, logits in rows_logits(model, rows, mixed, max_batch, x.device, precision=precision):
            curve[r] = logits.softmax(1).gather(1, targets[n_of[r], k_of[r]][:, None])[:, 0]
            progress.step(len(r))
        curve = curve.reshape(N, K, steps + 1)
        out[name] = curve
        out[f"{name}_auc"] = torch.trapezoid(curve, dx=1.0 / steps, dim=-1)
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rank correlation over the trailing axes: [N, K, ...] x2 -> [N, K]."""
    def ranks(t):
        flat = t.reshape(*t.shape[:2], -1).float()
        return flat.argsort(-1).argsort(-1).float()

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(1e-12)


def parameter_layers(model: nn.Module) -> List[str]:
    """Modules holding parameters of their own, in definition order (bottom to top)."""
    return [name for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))]


@dataclass
class SanityCheck:
    """Cascading randomization on a private copy of the model (the run's model is never touched)."""

    model: nn.Module
    steps: int
    seed: int
    layout: str = "auto"  # as the run reads its layers (pipeline.layouts)

    def __post_init__(self):
        self.original = self.model
        self.copy = copy.deepcopy(self.model)
        layers = parameter_layers(self.copy)[::-1]  # top first
        cuts = sorted({max(1, round(len(layers) * (j + 1) / self.steps)) for j in range(self.steps)})
        self.groups = [layers[:c] for c in cuts]  # cumulative, top down
        self.labels = [g[-1] for g in self.groups]  # the deepest module re-initialized

    def correlations(self, x: torch.Tensor, layers: Sequence[str], target, techniques: Dict[str, Technique],
                     originals: Dict[Key, torch.Tensor], targets: torch.Tensor, max_batch: int,
                     seed: int = 0, ids: Optional[Sequence[str]] = None,
                     progress: Progress = NO_PROGRESS) -> Dict[Key, torch.Tensor]:
        """{key: [N, K, steps]} Spearman correlation of each map with its original after each group;
        `progress` counts the groups."""
        self.copy.load_state_dict(self.original.state_dict())
        modules = dict(self.copy.named_modules())
        done: set = set()
        per_step: Dict[Key, List[torch.Tensor]] = {key: [] for key in originals}
        progress.add(len(self.groups))
        for j, group in enumerate(self.groups):
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                torch.manual_seed(self.seed + j)
                for name in group:
                    if name not in done and hasattr(modules[name], "reset_parameters"):
                        modules[name].reset_parameters()
                    done.add(name)
            for p in self.copy.parameters():
                p.requires_grad_(False)
            needs = frozenset().union(*(t.needs for t in techniques.values()))
            shared = Pass(self.copy, x, layers, target, max_batch=max_batch, needs=needs,
                          seed=seed, ids=ids, targets=targets, layout=self.layout)
            for name in {key[0] for key in originals}:
                result = techniques[name].attribute(self.copy, x, layers, target, shared=shared)
                for key in [k for k in originals if k[0] == name]:
                    per_step[key].append(spearman(originals[key], result.maps[key[1], key[2]]))
            progress.step(1)
        return {key: torch.stack(values, -1) for key, values in per_step.items()}
