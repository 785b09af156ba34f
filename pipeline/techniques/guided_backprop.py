"""Guided backpropagation (Springenberg et al. 2014, https://arxiv.org/abs/1412.6806)."""
from __future__ import annotations

import torch

from pipeline.contracts import Family, Kind, Output, Paper
from pipeline.hooks import relu_backward_rule
from pipeline.techniques.base import INPUT, Pass, Technique, register, target_scores


def rule_input_grads(p: Pass, rule: str) -> torch.Tensor:
    """[N, K, C, (T,) H, W] input gradient with every ReLU's backward swapped for `rule`
    ("guided" | "deconvnet", see pipeline.hooks.relu_backward_rule): one forward and one backward
    per target for the whole batch, memoized on the Pass as "<rule>_grads" (guided_gradcam reuses it).
    """

    def compute(keep_masks: bool) -> torch.Tensor:
        x = p.x.detach().requires_grad_(True)
        with torch.enable_grad(), relu_backward_rule(p.model, rule, keep_masks) as routed:
            logits = p.model(x)  # [N, classes]
            if routed.calls == 0:
                raise ValueError(
                    f"{rule}: the model ran no ReLU (nn.ReLU/ReLU6, F.relu, torch.relu, x.relu(), F.relu6, "
                    "F.hardtanh(x, 0, max)), so the map would be the plain gradient; use saliency")
            p.set_logits(logits)  # forward values are the plain model's: the targets need no other pass
            K = p.targets.shape[1]
            grads = [torch.autograd.grad(target_scores(logits, p.targets, k), x, retain_graph=k < K - 1)[0]
                     for k in range(K)]
        return torch.stack(grads, 1)

    def masks_if_needed() -> torch.Tensor:
        try:
            return compute(keep_masks=False)
        except RuntimeError as err:  # a rectifier's output changed in place after it: keep masks
            if "modified by an inplace operation" not in str(err):
                raise
            return compute(keep_masks=True)

    return p.shared(f"{rule}_grads", masks_if_needed)


@register("guided_backprop")
class GuidedBackprop(Technique):
    """Input gradient where each ReLU passes back only positive gradient, and only where its input
    was positive: map [N, K, C, (T,) H, W]."""

    family = Family.BACKPROP
    paper = Paper("Springenberg et al. 2014", "https://arxiv.org/abs/1412.6806")
    outputs = {"map": Output(Kind.GRADIENT, "[N, K, C, (T,) H, W]")}
    uses_layers = False
    torchscript = False

    def _attribute(self, p):
        return {(INPUT, "map"): rule_input_grads(p, "guided")}
