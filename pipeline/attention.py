"""Capturing a transformer's attention weights: `with attention_maps(model, grad=...) as att:`.

Two kinds of self-attention are reached:

* timm's `Attention` family (ViT, DeiT, ...): a module with a `fused_attn` flag and an `attn_drop`
  submodule. With `fused_attn` off, the module computes softmax(q k^T / sqrt(d)) explicitly and
  passes the probabilities [N, heads, T, T] through `attn_drop` (identity in eval mode), whose
  forward hook records them; the flag is switched off for the block only and restored in
  `finally`. With grad=True the hook hands the model the recorded tensor itself (a leaf that
  requires grad when nothing upstream does), so `torch.autograd.grad(score, att)` gives
  d score / d attention and nothing else.
* torchvision's `nn.MultiheadAttention` (its `VisionTransformer` calls it with need_weights=False):
  a forward pre-hook asks for the per-head weights (need_weights=True,
  average_attn_weights=False), a forward hook records them. The weights it returns are a copy the
  output does not depend on, so no gradient reaches them: grad=True is refused for this kind.

Hooks are registered on entry and removed in `finally`, also when the model raises.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Tuple

import torch
from torch import nn

TIMM, TORCHVISION = "timm", "torchvision"
# nn.MultiheadAttention.forward's parameters, in order (to move positional ones into kwargs)
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")


def attention_modules(model: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """[(name, module, kind)] of the self-attention modules whose weights can be captured, in
    definition order; kind is TIMM or TORCHVISION. Empty for a model without any (a CNN)."""
    if isinstance(model, torch.jit.ScriptModule):
        return []
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            found.append((name, m, TORCHVISION))
        elif isinstance(getattr(m, "fused_attn", None), bool) and isinstance(getattr(m, "attn_drop", None), nn.Module):
            found.append((name, m, TIMM))
    return found


def refuse_without_attention(technique: str, model: nn.Module, grad: bool = False) -> None:
    """ValueError unless `model` has attention weights this module can capture (and, with grad,
    that gradients can reach)."""
    found = attention_modules(model)
    if not found:
        raise ValueError(f"{technique} reads the attention weights of a transformer (timm ViT / DeiT "
                         "`Attention`, torchvision `VisionTransformer`); "
                         f"{type(model).__name__} has no attention module whose weights can be captured")
    if grad:
        tv = [name for name, _, kind in found if kind == TORCHVISION]
        if tv:
            raise ValueError(f"{technique} needs gradients w.r.t. the attention weights, and torchvision's "
                             f"nn.MultiheadAttention ({tv[0]}) returns a copy of them that its output does not "
                             "depend on; use attention_rollout, or a timm ViT (model=timm)")


@contextmanager
def attention_maps(model: nn.Module, *, grad: bool = False) -> Iterator[List[torch.Tensor]]:
    """Record every self-attention's weights [N, heads, T, T], in the order the blocks run.

    Yields a list that each forward pass through `model` fills (cleared at the start of every
    pass). grad=False: detached copies. grad=True (timm only): tensors in the autograd graph,
    for `torch.autograd.grad`. ValueError when the model has no capturable attention.
    """
    found = attention_modules(model)
    refuse_without_attention("attention_maps", model, grad)
    att: List[torch.Tensor] = []
    handles, flags = [], []

    def clear(module, inputs):
        att.clear()

    def record_probs(module, inputs, output):
        if not grad:
            att.append(output.detach().clone())
            return None
        if not output.requires_grad:  # nothing upstream needs grad: the attention is a leaf that does
            output = output.detach().requires_grad_(True)
        att.append(output)
        return output

    def ask_weights(module, args, kwargs):
        kwargs = {**dict(zip(_MHA_ARGS, args)), **kwargs, "need_weights": True, "average_attn_weights": False}
        return (), kwargs

    def record_weights(module, inputs, output):
        weights = output[1]
        if weights is None or weights.dim() != 4:
            raise RuntimeError(f"{type(module).__name__} returned no per-head attention weights")
        att.append(weights.detach().clone())

    try:
        handles.append(model.register_forward_pre_hook(clear))
        for name, m, kind in found:
            if kind == TIMM:
                flags.append((m, m.fused_attn))
                m.fused_attn = False  # the explicit softmax path, through attn_drop
                handles.append(m.attn_drop.register_forward_hook(record_probs))
            else:
                handles.append(m.register_forward_pre_hook(ask_weights, with_kwargs=True))
                handles.append(m.register_forward_hook(record_weights))
        yield att
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in flags:
            m.fused_attn = flag


def check_recorded(att: List[torch.Tensor], model: nn.Module, batch: int) -> None:
    """RuntimeError unless one forward recorded one square attention [N, heads, T, T] per module;
    ValueError unless all are over the same T tokens of each of the `batch` inputs (global
    self-attention, not windows)."""
    expected = len(attention_modules(model))
    if len(att) != expected:
        raise RuntimeError(f"{expected} attention modules but {len(att)} attention maps recorded in one "
                           "forward pass; this attention variant does not pass its weights through attn_drop")
    shapes = {(a.shape[0], *a.shape[2:]) for a in att}
    if any(a.dim() != 4 or a.shape[2] != a.shape[3] for a in att) or shapes != {(batch, *att[0].shape[2:])}:
        raise ValueError(f"attention weights of shapes {sorted({tuple(a.shape) for a in att})} for {batch} inputs: "
                         "not one global self-attention over the same tokens in every block (windowed "
                         "attention, e.g. Swin, is not supported)")
