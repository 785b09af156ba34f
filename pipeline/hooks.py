"""The one place that hooks a model: `with capture(model, layers) as acts:` and
`with relu_backward_rule(model, "guided" | "deconvnet"):`.

Hooks are registered on entry and removed in `finally`, so no hook outlives the block, also when
the model raises. Each hooked module's output is recorded and a clone is passed on downstream, so
inplace ops after the layer (inplace ReLU, `out += identity`) cannot overwrite what was recorded.
The ReLU rules need no hook: a torch function mode of this thread routes every rectifier call,
module or functional, and is switched off on exit.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from pipeline.layouts import NCHW, Layout, detect


class StopForward(Exception):
    """Raised by `capture(..., stop=True)` once every captured layer has run; see `forward`."""


def forward(model: nn.Module, x: torch.Tensor):
    """model(x), or None when a `capture(..., stop=True)` ended the pass early."""
    try:
        return model(x)
    except StopForward:
        return None


@contextmanager
def capture(
    model: nn.Module, layers: Sequence[str], *, grad: bool = False, stop: bool = False,
    layout: str = "nchw", found: Optional[Dict[str, Layout]] = None,
) -> Iterator[Dict[str, torch.Tensor]]:
    """Record the outputs of `layers` (names from `named_modules()`) during forward passes.

    grad=False: recorded tensors are detached copies.
    grad=True: each recorded output is part of the autograd graph; an output that does not yet
    require grad becomes a leaf that does, so a backward pass stops at the shallowest recorded
    layer and never runs below it. Yields {layer: tensor [N, ...]} (the last call's output when
    a module runs more than once).
    stop=True: the forward pass ends (StopForward) as soon as every layer has run once, so the
    rest of the network is not computed; call the model through `forward()` to get None then.
    layout: "nchw" records outputs as they are; "auto" (or a forced "nhwc" / "tokens") reads each
    layer's layout from its output, the model input's size and the model (pipeline.layouts.detect):
    a channels-last or token output is recorded as maps [N, C, h, w], and with grad=True the
    model goes on with the output rebuilt from the recorded maps, so gradients w.r.t. them flow.
    found: a dict that receives each layer's Layout.
    """
    size: list = []  # the model input's (H, W), recorded by a pre-hook on the model itself
    modules = dict(model.named_modules())
    acts: Dict[str, torch.Tensor] = {}
    handles = []
    seen: set = set()

    def make_hook(name: str):
        def hook(module: nn.Module, inputs, output):
            if not torch.is_tensor(output):
                raise TypeError(
                    f"layer {name!r} ({type(module).__name__}) returns {type(output).__name__}, "
                    "not a tensor; choose one of its submodules"
                )
            read = NCHW if layout == "nchw" else detect(tuple(output.shape), size[-1], model, layout)
            if found is not None:
                found[name] = read
            if not grad:
                acts[name] = read.to_maps(output.detach()).clone()
                result = None
            elif read.kind == "nchw":
                if not output.requires_grad:
                    output = output.detach().requires_grad_(True)
                acts[name] = output
                result = output.clone()
            else:
                maps = read.to_maps(output)
                if not output.requires_grad:  # a leaf: the backward stops here, as above
                    output, maps = output.detach(), maps.detach().requires_grad_(True)
                acts[name] = maps
                result = read.from_maps(maps, output)
            if stop:
                seen.add(name)
                if len(seen) == len(layers):
                    seen.clear()
                    raise StopForward
            return result

        return hook

    def record_size(module, inputs):
        x = next((t for t in inputs if torch.is_tensor(t)), None)
        size[:] = [tuple(x.shape[-2:]) if x is not None and x.dim() >= 3 else (1, 1)]

    try:
        if layout != "nchw":
            handles.append(model.register_forward_pre_hook(record_size))
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


# -- ReLU backward rules (guided backprop, deconvnet) ---------------------------------------------
RULES = ("guided", "deconvnet")


def _relu(input, inplace=False):
    return input, 0.0, None, inplace


def _relu6(input, inplace=False):
    return input, 0.0, 6.0, inplace


def _hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    return input, min_val, max_val, inplace


# Every way eager code calls a rectifier -> (input, lower, upper or None, inplace). nn.ReLU calls
# F.relu and nn.ReLU6 calls F.hardtanh(x, 0, 6), so modules and functional calls are all caught.
_RECTIFIERS = {
    F.relu: _relu,
    torch.relu: lambda input: _relu(input),
    torch.Tensor.relu: lambda input: _relu(input),
    torch.relu_: lambda input: _relu(input, True),
    torch.Tensor.relu_: lambda input: _relu(input, True),
    F.relu6: _relu6,
    F.hardtanh: _hardtanh,
    F.hardtanh_: lambda input, min_val=-1.0, max_val=1.0: _hardtanh(input, min_val, max_val, True),
}


class _RuleReLU(torch.autograd.Function):
    """Forward: clamp(x, lower, upper), unchanged. Backward: the chosen rule instead of the chain rule.

    guided:    grad_in = grad_out * [lower < x < upper] * [grad_out > 0]
    deconvnet: grad_in = relu(grad_out), the forward mask ignored

    guided keeps the output y (lower < y < upper exactly where lower < x < upper; the next layer
    keeps y for its own backward anyway) and applies the mask in one fused pass; with keep_mask it
    keeps a separate boolean mask instead, for models that modify a rectifier's output in place.
    """

    @staticmethod
    def forward(ctx, x, lower, upper, rule, inplace, keep_mask):
        ctx.rule, ctx.lower, ctx.upper, ctx.keep_mask = rule, lower, upper, keep_mask
        if rule == "guided" and keep_mask:
            ctx.save_for_backward(x > lower if upper is None else (x > lower) & (x < upper))
        y = x.clamp_(lower, upper) if inplace else x.clamp(lower, upper)
        if inplace:
            ctx.mark_dirty(x)
        if rule == "guided" and not keep_mask:
            ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clamp_min(0)
        if ctx.rule == "guided":
            (saved,) = ctx.saved_tensors
            if ctx.keep_mask:
                grad = grad * saved
            elif ctx.upper is None:  # grad where y > lower, else 0: one pass
                grad = torch.ops.aten.threshold_backward(grad, saved, ctx.lower)
            else:  # grad where lower < y < upper
                grad = torch.ops.aten.hardtanh_backward(grad, saved, ctx.lower, ctx.upper)
        return grad, None, None, None, None, None


class _RuleMode(TorchFunctionMode):
    """Routes every rectifier call (see _RECTIFIERS) of this thread through _RuleReLU."""

    def __init__(self, rule: str, keep_masks: bool = False):
        super().__init__()
        self.rule, self.keep_masks, self.calls = rule, keep_masks, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        parse = _RECTIFIERS.get(func)
        if parse is not None:
            x, lower, upper, inplace = parse(*args, **kwargs)
            if lower == 0 and (upper is None or upper > 0) and torch.is_tensor(x) and x.is_floating_point():
                self.calls += 1
                return _RuleReLU.apply(x, lower, upper, self.rule, inplace, self.keep_masks)
        return func(*args, **kwargs)


@contextmanager
def relu_backward_rule(model: nn.Module, rule: str, keep_masks: bool = False) -> Iterator[_RuleMode]:
    """Run `model` with ReLU backward rules swapped: `with relu_backward_rule(model, "guided") as r:`.

    Forward values are unchanged. Every rectifier called in this thread inside the block, whether
    an nn.ReLU / nn.ReLU6 module (inplace or not) or a functional call (F.relu, torch.relu,
    x.relu(), their inplace forms, F.relu6, F.hardtanh(x, 0, max)), gets the rule's backward;
    ReLU6's forward mask is 0 < x < 6. Other activations keep their ordinary gradient. Nothing on
    the model is touched (no hooks, flags or parameters), and the rule is switched off in
    `finally`. `r.calls` counts the rectifiers routed: 0 after a forward means the rule did nothing.
    A TorchScript (sub)module is refused with ValueError, since its rectifiers cannot be reached.
    The guided rule reads its mask off each rectifier's output; a model that then changes that
    output in place makes the backward raise autograd's "modified by an inplace operation"
    RuntimeError: `keep_masks=True` keeps a separate mask per rectifier instead (slower).
    """
    if rule not in RULES:
        raise ValueError(f"unknown ReLU backward rule {rule!r}; expected one of {RULES}")
    scripted = [name or "<model>" for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise ValueError(f"{rule} backward rules cannot reach the ReLUs inside TorchScript modules "
                         f"({', '.join(scripted[:3])}); load an eager model (a state dict and model.arch)")
    mode = _RuleMode(rule, keep_masks)
    with mode:
        yield mode
