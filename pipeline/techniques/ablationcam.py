"""Ablation-CAM (Desai & Ramaswamy, WACV 2020,
https://openaccess.thecvf.com/content_WACV_2020/html/Desai_Ablation-CAM_Visual_Explanations_for_Deep_Convolutional_Network_via_Gradient-free_Localization_WACV_2020_paper.html)."""
from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Dict, Iterator, Optional

import torch
from torch import nn

from pipeline.contracts import Paper
from pipeline.layouts import NCHW, Layout
from pipeline.precision import forward_autocast
from pipeline.progress import Attempt
from pipeline.techniques.base import chunks, register
from pipeline.techniques.gradcam import CAM
from pipeline.techniques.incremental import Unsupported
from pipeline.techniques.tail import Tail
from pipeline.techniques.scorecam import ForwardCAM, channel_scores, top_kept, weighted_sum

log = logging.getLogger(__name__)


@contextmanager
def zero_channels(module: nn.Module, layout: Layout = NCHW) -> Iterator[SimpleNamespace]:
    """While open, row i of the module's output has channel `state.channels[i]` set to 0 (set
    `state.channels` [m] before each forward), the channel axis read through `layout`
    (channels-last, tokens: pipeline.layouts). The hook is removed in finally."""
    state = SimpleNamespace(channels=None)
    handle = module.register_forward_hook(lambda mod, inputs, out: ablated(out, state.channels, layout))
    try:
        yield state
    finally:
        handle.remove()


def ablated(out: torch.Tensor, channels: torch.Tensor, layout: Layout = NCHW) -> torch.Tensor:
    """A layer output [m, ...] as a new tensor with row i's channel channels[i] zeroed (-1: none),
    the channel axis read through `layout`."""
    maps = layout.to_maps(out).clone()  # [m, C, h, w]
    rows = (channels >= 0).nonzero()[:, 0]
    maps[rows, channels[rows]] = 0
    return layout.from_maps(maps, out)


def grown_copies(out: torch.Tensor, channels: torch.Tensor, layout: Layout = NCHW) -> torch.Tensor:
    """One input's layer output [1, ...] as m = len(channels) copies [m, ...], copy i with channel
    channels[i] zeroed (-1: none), the channel axis read through `layout`."""
    if out.shape[0] != 1:
        raise RuntimeError(f"the layer output has batch {out.shape[0]}; one input is grown at a time")
    return ablated(out.expand(len(channels), *out.shape[1:]), channels, layout)


@contextmanager
def grow_at(module: nn.Module, layout: Layout = NCHW) -> Iterator[SimpleNamespace]:
    """While open, a forward of ONE input grows the batch at `module`: its output [1, ...] is handed
    on as grown_copies(out, state.channels), so only the network after the module runs m rows (the
    layers before run once per forward). Tensors from before the module that the rest of the
    network reuses (a residual) keep batch 1 and broadcast, which is exact for elementwise use;
    anything else raises or is caught by the caller's check. Set `state.channels` [m] (long)
    before each forward; the hook is removed in finally."""
    state = SimpleNamespace(channels=None)
    handle = module.register_forward_hook(lambda mod, inputs, out: grown_copies(out, state.channels, layout))
    try:
        yield state
    finally:
        handle.remove()


_TAILS: "weakref.WeakKeyDictionary[nn.Module, Dict[str, object]]" = weakref.WeakKeyDictionary()


def traced_tail(model: nn.Module, layer: str) -> Optional[Tail]:
    """The model's graph after `layer` (pipeline.techniques.tail), traced once per model and
    layer; None (logged once) when torch.fx cannot split the model there."""
    tails = _TAILS.setdefault(model, {})
    if layer not in tails:
        try:
            tails[layer] = Tail(model, layer)
        except Unsupported as err:
            log.info("ablationcam: %s: the layers before it run again for each chunk of ablated copies "
                     "(no traced graph to split there: %s)", layer, str(err)[:200])
            tails[layer] = None
    return tails[layer]


def tail_jobs(N: int, Ck: int, max_batch: int):
    """[(input n, slice of its kept channels, carries the check copy)] covering every (n, channel)
    once, at most max_batch grown rows per forward; the first forward carries the unablated copy
    (alone when max_batch is 1)."""
    first = min(Ck, max_batch - 1)
    jobs = [(0, slice(0, first), True)]
    jobs += [(0, slice(first + s.start, first + s.stop), False) for s in chunks(Ck - first, max_batch)]
    return jobs + [(n, s, False) for n in range(1, N) for s in chunks(Ck, max_batch)]


def tail_scores(p, layer: str, kept: torch.Tensor) -> Optional[torch.Tensor]:
    """Target logits [N, K, C'] with channel kept[n, j] of `layer` zeroed for input n, computed by
    running the network after `layer` on max_batch ablated copies at a time: the traced graph
    after the layer from one clean run per input (traced_tail), or, where the model cannot be
    traced, the whole model on one input with the copies grown at the layer's hook (grow_at: the
    layers before run once per chunk). None when the network after the layer cannot take the
    copies: the first chunk carries one unablated copy, which must reproduce the input's logits
    (else the caller runs whole forwards)."""
    N, Ck = kept.shape
    K = p.targets.shape[1]
    scores = torch.empty(N, K, Ck, device=p.x.device)
    clean = p.logits.float()
    tol = 1e-4 if p.precision == "fp32" else 5e-2  # the grown copy's logits against the batch's own (fp32) forward
    progress = Attempt(p.progress)  # abandoned (its rows taken back) when whole forwards redo them
    progress.add(N * Ck)
    layout, tail = p.layout_of(layer), traced_tail(p.model, layer)
    clean_run: Dict[str, object] = {}  # the traced clean values of the input being ablated

    def forward(n: int, channels: torch.Tensor) -> torch.Tensor:
        if tail is None:
            grown.channels = channels
            return p.model(p.x[n:n + 1])
        if clean_run.get("n") != n:
            clean_run.update(n=n, env=tail.clean(p.x[n:n + 1]))
        env = clean_run["env"]
        out = tail.run(env, grown_copies(env[tail.at], channels, layout))
        if not torch.is_tensor(out):
            raise RuntimeError(f"the traced graph returns {type(out).__name__}, not logits")
        return out

    with torch.no_grad(), (grow_at(p.model.get_submodule(layer), layout) if tail is None else nullcontext()) as grown:
        for n, s, check in tail_jobs(N, Ck, p.max_batch):
            channels = kept[n, s]
            channels = torch.cat([channels.new_full((1,), -1), channels]) if check else channels
            try:
                with forward_autocast(p.precision, p.x.device):
                    logits = forward(n, channels).float()
            except RuntimeError as err:  # e.g. a concatenation with a tensor from before the layer
                log.info("ablationcam: %s: whole forwards per ablated copy (the network after the "
                         "layer does not take a grown batch: %s)", layer, err)
                progress.abandon()
                return None
            if logits.shape[0] != len(channels) or (
                    check and not torch.allclose(logits[0], clean[n], rtol=tol, atol=tol * float(clean[n].abs().max()))):
                log.info("ablationcam: %s: whole forwards per ablated copy (an unablated copy grown "
                         "at the layer did not reproduce the logits)", layer)
                progress.abandon()
                return None
            logits = logits[1:] if check else logits
            scores[n, :, s] = logits[:, p.targets[n]].t()
            progress.step(len(logits))
    return scores


@register("ablationcam")
class AblationCAM(ForwardCAM):
    """Channel weight = (y - y_c) / y, y the target logit and y_c the logit with channel c of the
    layer zeroed. With `tail` (default) only the network after the layer runs for the ablated
    copies (max_batch per forward; the layers before once per input from the traced graph, or once
    per chunk where the model cannot be traced: tail_scores), checked on an unablated copy;
    otherwise, or where that check fails, the whole model re-runs with a hook, max_batch (input,
    channel) rows per forward. Returns cam [N, K, *S]."""

    paper = Paper("Desai & Ramaswamy 2020",
                  "https://openaccess.thecvf.com/content_WACV_2020/html/Desai_Ablation-CAM_Visual_Explanations_for_Deep_Convolutional_Network_via_Gradient-free_Localization_WACV_2020_paper.html")

    @dataclass
    class Options(CAM.Options):
        top_channels: Optional[int] = None  # ablate only the channels of highest mean activation (null: all)
        tail: bool = True  # run only the network after the layer for the ablated copies (checked)

        def __post_init__(self):
            if self.top_channels is not None and self.top_channels < 1:
                raise ValueError(f"ablationcam: top_channels={self.top_channels} must be >= 1 (or null)")

    def layer_cam(self, p, layer, acts):
        y = p.logits.gather(1, p.targets)[..., None]  # [N, K, 1]
        if p.precision != "fp32":  # y_c in bf16 / fp16: y from forwards in the same precision, so the offset cancels
            y = p.shared(f"target_logits_{p.precision}", lambda: torch.cat(
                [logits.gather(1, p.targets[r]) for r, logits in p.rows_logits(len(p.x), lambda r: p.x[r])]))[..., None]
        if self.options.tail:
            kept = top_kept(acts, self.options.top_channels)
            scores = tail_scores(p, layer, kept)
            if scores is not None:
                return weighted_sum(acts, (y - scores) / torch.where(y != 0, y, torch.ones_like(y)), kept)
        with zero_channels(p.model.get_submodule(layer), p.layout_of(layer)) as zeroed:
            def rows(n, c):
                zeroed.channels = c
                return p.x[n]

            scores, kept = channel_scores(p, acts, self.options.top_channels, rows)
        return weighted_sum(acts, (y - scores) / torch.where(y != 0, y, torch.ones_like(y)), kept)
