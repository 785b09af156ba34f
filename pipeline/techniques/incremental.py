"""Occlusion by incremental inference (Krypton, Nakandala et al. 2019, https://arxiv.org/abs/1807.01624).

`Incremental(model)` traces the model once with torch.fx (pipeline.rf.graph.trace: convolution and
pooling modules kept whole). `rows(x, ys, xs, size, fill, total, chunk, reference)` runs each
clean input of x [N, C, H, W] once, keeping every node's output, then yields (idx [m], logits
[m, classes]) for its occluded copies, row r = copy of input r // P with the window (ys[r % P],
xs[r % P]) of `size` set to `fill`, `chunk` rows at a time. A copy's tensor at a node is a `Patch`:
the clean output plus, per copy, a box of fixed size (its offset clamped so that it lies inside the map) that holds every
value the window can change. Convolutions and pools recompute only their output box, from the
input box grown by the kernel's halo; pointwise operations (eval BatchNorm, activations, sums and
products of two patches: the union box; scaling by constants) work on the box. Any other operation
(global pooling, squeeze-excite gates, flatten + linear ...), or a box that covers most of its map,
materializes the copies' full tensors and runs the rest of the graph on them as the model would.

A model that cannot be traced, or whose traced graph does not reproduce its logits, raises
`Unsupported`; the caller then runs the full copies (occlusion's `incremental: false` path).
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_aggregate

from pipeline.rf.graph import trace

FULL_FRACTION = 0.6  # a box covering this share of its map or more: the copies go full from there

_POINTWISE_MODULES = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU,
                      nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                      nn.Hardtanh, nn.Softplus, nn.Identity, nn.modules.dropout._DropoutNd)
_UNARY = {"relu", "relu_", "relu6", "gelu", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_",
          "hardswish", "hardswish_", "hardsigmoid", "hardtanh", "hardtanh_", "leaky_relu", "elu", "mish",
          "softplus", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "neg", "abs", "contiguous",
          "clone", "detach", "batch_norm", "dropout", "dropout2d", "identity"}
_BINARY = {"add", "add_", "iadd", "sub", "sub_", "isub", "mul", "mul_", "imul", "truediv", "div", "div_",
           "itruediv"}
_SHAPE = {"size", "dim"}
INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)
_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}


class Unsupported(ValueError):
    """The model cannot be run incrementally (the caller falls back to full inference)."""


@dataclass
class Patch:
    """Copies of one node's tensor: clean[src] with the box (y0, x0) + data's size replaced by data."""

    clean: torch.Tensor  # [N, C, H, W] the clean output (N = 1: one input at a time)
    src: torch.Tensor  # [m] each copy's input
    y0: torch.Tensor  # [m] box offsets, inside the map
    x0: torch.Tensor  # [m]
    data: torch.Tensor  # [m, C, bh, bw]
    _full: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def box(self) -> Tuple[int, int]:
        return self.data.shape[2], self.data.shape[3]

    def full(self) -> torch.Tensor:
        """The copies' whole tensors [m, C, H, W] (made once)."""
        if self._full is not None:
            return self._full
        (bh, bw), m = self.box, len(self.src)
        out = self.clean[self.src].clone()
        rows = self.y0[:, None] + torch.arange(bh, device=out.device)
        cols = self.x0[:, None] + torch.arange(bw, device=out.device)
        out[torch.arange(m, device=out.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]] = \
            self.data.permute(0, 2, 3, 1)
        self._full = out
        return out

    def region(self, ys: torch.Tensor, xs: torch.Tensor, h: int, w: int, base: torch.Tensor,
               top: int = 0, left: int = 0) -> torch.Tensor:
        """[m, C, h, w]: each copy's tensor, padded as `base` (clean padded by top / left ...), at
        rows ys.. and columns xs.. of the padded frame."""
        dev, (bh, bw), (m, C) = base.device, self.box, self.data.shape[:2]
        rows = ys[:, None] + torch.arange(h, device=dev)  # [m, h]
        cols = xs[:, None] + torch.arange(w, device=dev)
        crop = base[self.src[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        iy = rows - (self.y0 + top)[:, None]  # row of the box each crop row reads, where inside
        ix = cols - (self.x0 + left)[:, None]
        inside = (((iy >= 0) & (iy < bh))[:, :, None] & ((ix >= 0) & (ix < bw))[:, None, :])[:, None]
        g = self.data.gather(2, iy.clamp(0, bh - 1)[:, None, :, None].expand(m, C, h, bw))
        g = g.gather(3, ix.clamp(0, bw - 1)[:, None, None, :].expand(m, C, h, w))
        return torch.where(inside, g, crop)


def _pair(v) -> Tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _static_ok(v: Any) -> bool:
    """A constant operand a box can be combined with: a number, or a tensor constant over space."""
    if isinstance(v, (int, float, bool)):
        return True
    return torch.is_tensor(v) and (v.numel() == 1 or (v.dim() >= 3 and v.shape[-1] == v.shape[-2] == 1))


def public_state(model: nn.Module) -> list:
    """Each module's public attributes: (module, {name: (value, a copy of a list / dict / set)})."""
    return [(m, {k: (v, copy.copy(v) if isinstance(v, (list, dict, set)) else None)
                 for k, v in vars(m).items() if not k.startswith("_")}) for m in model.modules()]


def restore(model: nn.Module, saved: list) -> None:
    """Put back what `public_state` saw: values rebound, containers' contents, attributes added."""
    for m, attrs in saved:
        for k in [k for k in vars(m) if not k.startswith("_") and k not in attrs]:
            delattr(m, k)
        for k, (v, content) in attrs.items():
            if vars(m).get(k) is not v:
                setattr(m, k, v)
            if content is not None:  # refilled without comparing (elements may be proxies or tensors)
                v.clear()
                v.extend(content) if isinstance(v, list) else v.update(content)


def inplace_safe(fn, args: tuple, kwargs: dict):
    """Call fn with its first tensor argument cloned when the call would write into it."""
    if args and torch.is_tensor(args[0]):
        args = (args[0].clone(),) + tuple(args[1:])
    return fn(*args, **kwargs)


def traced(model: nn.Module, leaves=()) -> fx.GraphModule:
    """pipeline.rf.graph.trace(model, leaves), the model left as it was (tracing runs forward() once
    on proxies: what it writes into the modules' public attributes is put back); Unsupported
    when it cannot be traced."""
    saved = public_state(model)
    try:
        return trace(model, leaves)
    except Exception as err:  # noqa: BLE001 - GraphError or anything fx raised
        raise Unsupported(str(err)) from None
    finally:
        restore(model, saved)


def run_node(n: fx.Node, args: tuple, kwargs: dict, modules: Dict[str, nn.Module], gm: fx.GraphModule) -> Any:
    """Traced node n on ordinary values (its arguments resolved), as the model runs it; an in-place
    call writes into a copy of its first argument, never into a kept value."""
    if n.op == "call_module":
        m = modules[n.target]
        return inplace_safe(m, args, kwargs) if getattr(m, "inplace", False) else m(*args, **kwargs)
    if n.op == "call_function":
        fn = n.target
        inplace = _name(n).endswith("_") or fn in INPLACE_OPERATORS or kwargs.get("inplace")
        return inplace_safe(fn, args, kwargs) if inplace else fn(*args, **kwargs)
    if n.op == "call_method":
        self_, *rest = args
        if n.target.endswith("_") and torch.is_tensor(self_):
            self_ = self_.clone()
        return getattr(self_, n.target)(*rest, **kwargs)
    if n.op == "get_attr":
        obj = gm
        for part in n.target.split("."):
            obj = getattr(obj, part)
        return obj
    raise Unsupported(f"node {n.name}: {n.op}")


def clean_values(nodes: List[fx.Node], x: torch.Tensor, modules: Dict[str, nn.Module], gm: fx.GraphModule
                 ) -> Dict[fx.Node, Any]:
    """Every node's value for the graph's input x (the output node's: the model's output)."""
    env: Dict[fx.Node, Any] = {}
    for n in nodes:
        if n.op == "placeholder":
            env[n] = x
        else:
            args, kwargs = map_aggregate((n.args, n.kwargs), lambda a: env[a] if isinstance(a, fx.Node) else a)
            env[n] = args[0] if n.op == "output" else run_node(n, args, kwargs, modules, gm)
    return env


class Incremental:
    """The traced model run on occluded copies; see the module docstring."""

    def __init__(self, model: nn.Module):
        self.gm = traced(model)
        self.modules = dict(self.gm.named_modules())
        self.nodes = list(self.gm.graph.nodes)
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise Unsupported(f"the traced graph has {len(inputs)} inputs")
        self.input = inputs[0]
        live = {self.input}
        for n in self.nodes:  # nodes whose value depends on the input
            if any(a in live for a in n.all_input_nodes):
                live.add(n)
        self.live = live
        last: Dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a] = i
        self.free_after: Dict[int, List[fx.Node]] = {}
        for n, i in last.items():
            self.free_after.setdefault(i, []).append(n)

    # -- running nodes --------------------------------------------------------------------------
    def _call(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        """Node n on ordinary values, as the model runs it (in-place calls on a copy)."""
        return run_node(n, args, kwargs, self.modules, self.gm)

    def clean(self, x: torch.Tensor) -> torch.Tensor:
        """Run the clean batch, keeping every node's output; returns the logits."""
        env = clean_values(self.nodes, x, self.modules, self.gm)
        out = env[self.nodes[-1]]
        if not torch.is_tensor(out) or out.dim() != 2:
            raise Unsupported("the model does not return one logits tensor [N, classes]")
        self.env = env
        return out

    def rows(self, x: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, size: Tuple[int, int], fill: float,
             total: int, chunk: int, reference: torch.Tensor) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(idx [m], logits [m, classes]) for rows 0..total-1, `chunk` at a time (see the module docstring);
        `reference`: the model's own clean logits, which the traced graph must reproduce."""
        P = len(ys)
        with torch.no_grad():
            for n in range(x.shape[0]):  # one input's clean outputs kept at a time (memory of one forward)
                logits = self.clean(x[n:n + 1])
                ref = reference[n:n + 1]
                # a wrong trace is far off; float32 rounding between batch sizes is ~1e-5 of the logits
                if logits.shape != ref.shape or not ((logits - ref).abs().max() <= 1e-3 * ref.abs().max()):
                    raise Unsupported("the traced graph does not reproduce the model's logits")
                for s in range(0, P, max(1, chunk)):
                    w = torch.arange(s, min(P, s + chunk), device=x.device)
                    data = torch.full((len(w), x.shape[1]) + tuple(size), fill, dtype=x.dtype, device=x.device)
                    yield n * P + w, self._run(Patch(x[n:n + 1], torch.zeros_like(w), ys[w], xs[w], data))
                self.env = {}

    def _run(self, patch: Patch) -> torch.Tensor:
        env: Dict[fx.Node, Any] = {}
        m = len(patch.src)
        for i, n in enumerate(self.nodes):
            if n.op == "placeholder":
                env[n] = patch
            elif n.op == "output":
                out = map_aggregate(n.args[0], lambda a: env[a] if isinstance(a, fx.Node) else a)
                return out.full() if isinstance(out, Patch) else out
            elif n not in self.live:
                env[n] = self.env[n]
            else:
                args, kwargs = map_aggregate((n.args, n.kwargs), lambda a: env[a] if isinstance(a, fx.Node) else a)
                env[n] = self._step(n, args, kwargs, m)
            for dead in self.free_after.get(i, ()):
                env.pop(dead, None)
        raise Unsupported("the traced graph has no output")

    def _step(self, n: fx.Node, args: tuple, kwargs: dict, m: int) -> Any:
        flat: List[Any] = []
        map_aggregate((args, kwargs), flat.append)
        patches = [v for v in flat if isinstance(v, Patch)]
        if not patches:
            return self._call(n, args, kwargs)
        name, p = _name(n), patches[0]
        if n.op == "call_function" and name == "getattr" and args[1] in _ATTRS and args[0] is p:
            if args[1] == "shape":
                return torch.Size((m,) + p.clean.shape[1:])
            return 4 if args[1] == "ndim" else getattr(p.clean, args[1])
        if n.op == "call_method" and name in _SHAPE and args[0] is p:
            shape = torch.Size((m,) + p.clean.shape[1:])
            return (len(shape) if name == "dim" else
                    shape if len(args) < 2 and "dim" not in kwargs else shape[kwargs.get("dim", args[-1])])
        out = self._local(n, name, args, kwargs, patches)
        if out is not None:
            return out
        args, kwargs = map_aggregate((args, kwargs), lambda v: v.full() if isinstance(v, Patch) else v)
        return self._call(n, args, kwargs)

    # -- box-local operations -------------------------------------------------------------------------
    def _local(self, n: fx.Node, name: str, args: tuple, kwargs: dict, patches: List[Patch]) -> Optional[Any]:
        """The node's output as a Patch when it is box-local, else None (the caller materializes)."""
        clean = self.env[n]
        if not torch.is_tensor(clean) or clean.dim() != 4:
            return None
        p = patches[0]
        if n.op == "call_module":
            mod = self.modules[n.target]
            if len(args) != 1 or kwargs or args[0] is not p:
                return None
            batch_stats = isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is None
            if isinstance(mod, _POINTWISE_MODULES) and not mod.training and not batch_stats \
                    and clean.shape == p.clean.shape:
                return Patch(clean, p.src, p.y0, p.x0, self._call(n, (p.data,), {}))
            window = self._window(mod, p.clean.shape[2:], clean.shape[2:])
            if window is None:
                return None
            return self._windowed(mod, window, p, clean)
        if n.op not in ("call_function", "call_method"):
            return None
        if name in _UNARY and args and args[0] is p and len(patches) == 1:
            if name == "batch_norm":
                training = args[5] if len(args) > 5 else kwargs.get("training", False)
            else:
                training = name.startswith("dropout") and (args[2] if len(args) > 2 else kwargs.get("training", True))
            if training or clean.shape != p.clean.shape or not self._static(n, 1):
                return None
            others = [v for v in list(args[1:]) + list(kwargs.values()) if torch.is_tensor(v)]
            if name != "batch_norm" and not all(_static_ok(v) for v in others):
                return None
            return Patch(clean, p.src, p.y0, p.x0, self._call(n, (p.data,) + tuple(args[1:]), kwargs))
        if name in _BINARY and len(args) == 2 and set(kwargs) <= {"alpha"}:
            a, b = args
            if isinstance(a, Patch) and isinstance(b, Patch):
                if a.clean.shape != b.clean.shape or clean.shape != a.clean.shape:
                    return None
                if a.box == b.box and torch.equal(a.y0, b.y0) and torch.equal(a.x0, b.x0):
                    return Patch(clean, a.src, a.y0, a.x0, self._call(n, (a.data, b.data), kwargs))
                y0, x0, bh, bw = self._union(a, b, clean.shape[2:])
                if bh * bw >= FULL_FRACTION * clean.shape[2] * clean.shape[3]:
                    return None
                ra, rb = (q.region(y0, x0, bh, bw, q.clean) for q in (a, b))
                return Patch(clean, a.src, y0, x0, self._call(n, (ra, rb), kwargs))
            if (isinstance(a, Patch) and _static_ok(b) and self._static(n, 1)) or \
                    (isinstance(b, Patch) and _static_ok(a) and self._static(n, 0)):
                if clean.shape != p.clean.shape:
                    return None
                pa, pb = (v.data if isinstance(v, Patch) else v for v in (a, b))
                return Patch(clean, p.src, p.y0, p.x0, self._call(n, (pa, pb), kwargs))
        return None

    def _static(self, n: fx.Node, start: int) -> bool:
        """True when none of n's arguments from position `start` on (keywords included) depends on the input."""
        rest: List[Any] = []
        map_aggregate((n.args[start:], n.kwargs), rest.append)
        return not any(isinstance(a, fx.Node) and a in self.live for a in rest)

    @staticmethod
    def _union(a: Patch, b: Patch, hw) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
        """The smallest fixed-size box holding both boxes of every copy, clamped inside the map."""
        out = []
        for lo_a, lo_b, n_a, n_b, size in ((a.y0, b.y0, a.box[0], b.box[0], hw[0]), (a.x0, b.x0, a.box[1], b.box[1], hw[1])):
            lo = torch.minimum(lo_a, lo_b)
            span = int((torch.maximum(lo_a + n_a, lo_b + n_b) - lo).max())
            span = min(span, size)
            out.append((lo.clamp(max=size - span), span))
        (y0, bh), (x0, bw) = out
        return y0, x0, bh, bw

    def _window(self, mod: nn.Module, hw_in, hw_out) -> Optional[dict]:
        """Kernel, stride, dilation, pads (top, bottom, left, right), pad value and the function of a
        convolution or pool module the box rule knows, else None."""
        hw_in = tuple(int(v) for v in hw_in)
        if isinstance(mod, nn.Conv2d) and type(mod).__name__ in ("Conv2d", "Conv2dSame"):
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                return None
            k, s, d = mod.kernel_size, mod.stride, mod.dilation
            if type(mod).__name__ == "Conv2dSame":  # timm: TF "same" padding, the extra pixel after
                pads = []
                for i in range(2):
                    total = max((math.ceil(hw_in[i] / s[i]) - 1) * s[i] + (k[i] - 1) * d[i] + 1 - hw_in[i], 0)
                    pads += [total // 2, total - total // 2]
                if any(_pair(mod.padding)):
                    return None
            else:
                ph, pw = _pair(mod.padding)
                pads = [ph, ph, pw, pw]
            fn = lambda t: F.conv2d(t, mod.weight, mod.bias, s, 0, d, mod.groups)  # noqa: E731
            return dict(k=k, s=s, d=d, pads=pads, value=0.0, fn=fn, out=hw_out)
        if type(mod) in (nn.MaxPool2d, nn.AvgPool2d):
            k, s = _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size)
            ph, pw = _pair(mod.padding)
            if isinstance(mod, nn.MaxPool2d):
                if mod.return_indices:
                    return None
                d = _pair(mod.dilation)
                fn = lambda t: F.max_pool2d(t, k, s, 0, d)  # noqa: E731
                value = -math.inf
            else:
                if (ph or pw) and not mod.count_include_pad:
                    return None
                d = (1, 1)
                fn = lambda t: F.avg_pool2d(t, k, s, 0, divisor_override=mod.divisor_override)  # noqa: E731
                value = 0.0
            floor = tuple((hw_in[i] + 2 * (ph, pw)[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))
            if floor != tuple(hw_out):  # ceil_mode adding a partial window
                return None
            return dict(k=k, s=s, d=d, pads=[ph, ph, pw, pw], value=value, fn=fn, out=hw_out)
        return None

    def _windowed(self, mod: nn.Module, g: dict, p: Patch, clean: torch.Tensor) -> Optional[Patch]:
        """A convolution or pool on the output box: the input region it reads, the box pasted in."""
        k, s, d, (top, bottom, left, right) = g["k"], g["s"], g["d"], g["pads"]
        starts, sizes, reads = [], [], []
        for i, (lo, n, pad) in enumerate(((p.y0, p.box[0], top), (p.x0, p.box[1], left))):
            out_size = int(g["out"][i])
            size = min(out_size, (n - 1 + (k[i] - 1) * d[i]) // s[i] + 1)
            first = -torch.div(-(lo + pad - (k[i] - 1) * d[i]), s[i], rounding_mode="floor")  # ceil
            starts.append(first.clamp(0, out_size - size))
            sizes.append(size)
            reads.append((size - 1) * s[i] + (k[i] - 1) * d[i] + 1)
        if sizes[0] * sizes[1] >= FULL_FRACTION * clean.shape[2] * clean.shape[3]:
            return None
        ys, xs = starts[0] * s[0], starts[1] * s[1]
        if (reads[0], reads[1]) == p.box and torch.equal(ys, p.y0 + top) and torch.equal(xs, p.x0 + left):
            crop = p.data  # the region read is the box itself (e.g. a 1x1 convolution)
        else:
            base = F.pad(p.clean, (left, right, top, bottom), value=g["value"]) if any(g["pads"]) else p.clean
            crop = p.region(ys, xs, reads[0], reads[1], base, top, left)
        data = g["fn"](crop)
        if tuple(data.shape[2:]) != tuple(sizes):
            raise Unsupported(f"{type(mod).__name__}: box {tuple(data.shape[2:])} != {tuple(sizes)}")
        return Patch(clean, p.src, starts[0], starts[1], data)
