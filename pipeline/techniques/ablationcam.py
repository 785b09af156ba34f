"""Ablation-CAM (Desai & Ramaswamy, WACV 2020,
https://openaccess.thecvf.com/content_WACV_2020/html/Desai_Ablation-CAM_Visual_Explanations_for_Deep_Convolutional_Network_via_Gradient-free_Localization_WACV_2020_paper.html)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterator, Optional

import torch
from torch import nn

from pipeline.contracts import Paper
from pipeline.layouts import NCHW, Layout
from pipeline.techniques.base import register
from pipeline.techniques.gradcam import CAM
from pipeline.techniques.scorecam import ForwardCAM, channel_scores, weighted_sum


@contextmanager
def zero_channels(module: nn.Module, layout: Layout = NCHW) -> Iterator[SimpleNamespace]:
    """While open, row i of the module's output has channel `state.channels[i]` set to 0 (set
    `state.channels` [m] before each forward), the channel axis read through `layout`
    (channels-last, tokens: pipeline.layouts). The hook is removed in finally."""
    state = SimpleNamespace(channels=None)

    def hook(mod, inputs, out):
        maps = layout.to_maps(out).clone()  # [m, C, h, w]
        maps[torch.arange(maps.shape[0], device=maps.device), state.channels] = 0
        return layout.from_maps(maps, out)

    handle = module.register_forward_hook(hook)
    try:
        yield state
    finally:
        handle.remove()


@register("ablationcam")
class AblationCAM(ForwardCAM):
    """Channel weight = (y - y_c) / y, y the target logit and y_c the logit with channel c of the
    layer zeroed (the model re-run with a hook, max_batch (input, channel) rows per forward).
    Returns cam [N, K, *S]."""

    paper = Paper("Desai & Ramaswamy 2020",
                  "https://openaccess.thecvf.com/content_WACV_2020/html/Desai_Ablation-CAM_Visual_Explanations_for_Deep_Convolutional_Network_via_Gradient-free_Localization_WACV_2020_paper.html")

    @dataclass
    class Options(CAM.Options):
        top_channels: Optional[int] = None  # ablate only the channels of highest mean activation (null: all)

        def __post_init__(self):
            if self.top_channels is not None and self.top_channels < 1:
                raise ValueError(f"ablationcam: top_channels={self.top_channels} must be >= 1 (or null)")

    def layer_cam(self, p, layer, acts):
        y = p.logits.gather(1, p.targets)[..., None]  # [N, K, 1]
        with zero_channels(p.model.get_submodule(layer), p.layout_of(layer)) as zeroed:
            def rows(n, c):
                zeroed.channels = c
                return p.x[n]

            scores, kept = channel_scores(p, acts, self.options.top_channels, rows)
        return weighted_sum(acts, (y - scores) / torch.where(y != 0, y, torch.ones_like(y)), kept)
