"""The one place that hooks a model: `with capture(model, layers) as acts:`.

Hooks are registered on entry and removed in `finally`, so no hook outlives the block, also when
the model raises. Each hooked module's output is recorded and a clone is passed on downstream, so
inplace ops after the layer (inplace ReLU, `out += identity`) cannot overwrite what was recorded.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Sequence

import torch
from torch import nn


@contextmanager
def capture(
    model: nn.Module, layers: Sequence[str], *, grad: bool = False
) -> Iterator[Dict[str, torch.Tensor]]:
    """Record the outputs of `layers` (names from `named_modules()`) during forward passes.

    grad=False: recorded tensors are detached copies.
    grad=True: each recorded output is part of the autograd graph; an output that does not yet
    require grad becomes a leaf that does, so a backward pass stops at the shallowest recorded
    layer and never runs below it. Yields {layer: tensor [N, ...]} (the last call's output when
    a module runs more than once).
    """
    modules = dict(model.named_modules())
    acts: Dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs, output):
            if not torch.is_tensor(output):
                raise TypeError(
                    f"layer {name!r} ({type(module).__name__}) returns {type(output).__name__}, "
                    "not a tensor; choose one of its submodules"
                )
            if not grad:
                acts[name] = output.detach().clone()
                return None
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            acts[name] = output
            return output.clone()

        return hook

    try:
        for name in layers:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        yield acts
    finally:
        for handle in handles:
            handle.remove()


def hook_count(model: nn.Module) -> int:
    """Number of hooks of any kind left on the model's modules (0 after every technique)."""
    total = 0
    for module in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            total += len(getattr(module, attr, {}) or {})
    return total
