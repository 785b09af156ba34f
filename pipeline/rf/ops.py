"""The receptive-field rules themselves: what one operation does to the support maps it gets.

Each rule is a function `rule(op: Op) -> Support | END | value`, called for one operation of the
traced graph with a Support among its arguments; `pipeline.rf.rules` says which operation goes by
which rule. A case a rule cannot handle (a spatial axis concatenated, indexed or soft-maxed, a
transposed convolution ...) raises `GraphError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.rf.support import END, Field, Support, box, merge, union


class GraphError(ValueError):
    """The model cannot be traced, or an operation has no receptive-field rule."""


@dataclass
class Op:
    """One call in the traced graph with a Support among its arguments, as its rule sees it."""

    name: str  # the function or method name ("add", "flatten"), or the module's path
    args: tuple  # the call's arguments, Supports in place of spatial tensors
    kwargs: dict
    supports: List[Support]  # every Support among args and kwargs, in order
    out: Optional[Tuple[int, ...]]  # the real output's shape at this batch size; None if not one tensor
    meta: Any  # the real output as recorded: torch.Size per tensor, values otherwise
    batch: int
    module: Optional[nn.Module] = None  # the module called (call_module only)

    @property
    def s(self) -> Support:
        """The Support the operation acts on: its first one (the first argument when that is one)."""
        return self.supports[0]

    def arg(self, index: int, key: str, default: Any = None) -> Any:
        """Argument `key`, passed at position `index` or by keyword."""
        return self.args[index] if len(self.args) > index else self.kwargs.get(key, default)


Rule = Callable[[Op], Any]


def _tuple(v, d: int) -> Tuple:
    """A per-axis setting (an int for every axis, or one per axis) -> a tuple of d."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d


def _axes(dim, rank: int) -> Tuple[int, ...]:
    """A reduction's dim (None, an int or several) -> the sorted non-negative axes it reduces."""
    if dim is None:
        return tuple(range(rank))
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return tuple(sorted(d % rank for d in dims))


# -- shape queries: answered as for the real tensor ----------------------------------------------
def attribute(op: Op) -> Any:
    """getattr(x, name): x.shape a torch.Size, x.ndim an int, anything else (dtype, device) a CPU float tensor's."""
    name = op.args[1]
    if name == "shape":
        return torch.Size(op.s.shape)
    if name == "ndim":
        return len(op.s.shape)
    return getattr(torch.empty(0), name)


def size(op: Op) -> Any:
    """x.size() -> torch.Size; x.size(d) -> int."""
    dim = op.arg(1, "dim")
    return torch.Size(op.s.shape) if dim is None else op.s.shape[dim]


def ndim(op: Op) -> int:
    """x.dim() -> int."""
    return len(op.s.shape)


# -- maps that pass ------------------------------------------------------------------------------
def passthrough(op: Op) -> Support:
    """Activation, normalization, dropout modules: the map passes unchanged."""
    return op.s.with_map(op.s.map, op.out)


def elementwise(op: Op) -> Support:
    """An elementwise op: one spatial input passes; several are averaged, their fields united."""
    return merge(op.supports, op.out or op.s.shape)


def softmax(op: Op) -> Support:
    """softmax / log_softmax over a non-spatial axis: the map passes; over a spatial one: GraphError."""
    s, dim = op.s, op.arg(1, "dim")
    if dim is not None and dim % len(s.shape) in s.dims:
        raise GraphError(f"{op.name} over a spatial axis has no receptive-field rule")
    return s.with_map(s.map, op.out)


# -- sliding windows: box filters of the same geometry -------------------------------------------
def conv_module(op: Op) -> Support:
    """nn.ConvNd: a box filter of its kernel, stride, dilation, padding and groups."""
    m, s = op.module, op.s
    if m.transposed:
        raise GraphError(f"transposed convolution {op.name!r} has no receptive-field rule")
    return box(s, m.kernel_size, m.stride, m.dilation, _tuple(m.padding, len(m.kernel_size)), op.out[2:],
               groups=m.groups, out_channels=m.out_channels, padding_mode=m.padding_mode)


def pool_module(op: Op) -> Support:
    """nn.MaxPoolNd / nn.AvgPoolNd: a box filter of its window, channel by channel."""
    m, s = op.module, op.s
    d = len(s.dims)
    return box(s, _tuple(m.kernel_size, d), _tuple(m.stride or m.kernel_size, d), _tuple(getattr(m, "dilation", 1), d),
               _tuple(m.padding, d), op.out[2:], mix_channels=False, ceil_mode=m.ceil_mode)


def conv_function(op: Op) -> Support:
    """F.convNd(input, weight, bias, stride, padding, dilation, groups): a box filter of weight's kernel."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    a = dict(zip(names, op.args), **op.kwargs)
    w = a["weight"]
    d = w.dim() - 2
    return box(op.s, tuple(w.shape[2:]), _tuple(a.get("stride", 1), d), _tuple(a.get("dilation", 1), d),
               _tuple(a.get("padding", 0), d), op.out[2:], groups=a.get("groups", 1), out_channels=w.shape[0])


def max_pool_function(op: Op) -> Support:
    """F.max_poolNd(input, kernel_size, stride, padding, dilation, ceil_mode)."""
    return _pool_function(op, ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"))


def avg_pool_function(op: Op) -> Support:
    """F.avg_poolNd(input, kernel_size, stride, padding, ceil_mode)."""
    return _pool_function(op, ("input", "kernel_size", "stride", "padding", "ceil_mode"))


def _pool_function(op: Op, names: Sequence[str]) -> Support:
    a = dict(zip(names, op.args), **op.kwargs)
    s = op.s
    d = len(s.dims)
    if op.out is None:  # *_with_indices gives a tuple
        raise GraphError(f"{op.name}: cannot tell its output shape")
    return box(s, _tuple(a["kernel_size"], d), _tuple(a.get("stride") or a["kernel_size"], d),
               _tuple(a.get("dilation", 1), d), _tuple(a.get("padding", 0), d), op.out[2:],
               mix_channels=False, ceil_mode=bool(a.get("ceil_mode", False)))


# -- resampling ------------------------------------------------------------------------------------
def adaptive(op: Op) -> Any:
    """Adaptive pool (module or function): END for a global pool (output 1 per axis), else the
    adaptive average pool of the map with the fields of its widest window."""
    s, spatial_out = op.s, op.out[2:]
    if all(o == 1 for o in spatial_out):
        return END
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(s.dims)]
    fields = []
    for f, i, o in zip(s.fields, s.spatial, spatial_out):
        k = math.ceil(i / o)
        fields.append(Field(f.size + (k + (i % o != 0) - 1) * f.jump, f.jump * i / o, f.start + (k - 1) / 2 * f.jump))
    return Support(pool(s.map.float(), spatial_out), op.out, s.dims, tuple(fields))


def interpolate_function(op: Op) -> Support:
    """F.interpolate(input, size, scale_factor, mode='nearest', ...)."""
    return _interpolated(op.s, op.out, op.kwargs.get("mode", op.args[3] if len(op.args) > 3 else "nearest"))


def upsample_module(op: Op) -> Support:
    """nn.Upsample: as F.interpolate with the module's mode."""
    return _interpolated(op.s, op.out, op.module.mode)


def _interpolated(s: Support, out, mode: str) -> Support:
    """The map resized like the tensor (nearest stays nearest, every other mode (bi/tri)linear)."""
    d = len(s.dims)
    spatial_out = out[2:]
    m = s.map.float()
    if mode in ("nearest", "nearest-exact"):
        m = F.interpolate(m, size=spatial_out, mode=mode)
    else:
        m = F.interpolate(m, size=spatial_out, mode={1: "linear", 2: "bilinear", 3: "trilinear"}[d], align_corners=False)
    fields = []
    for f, i, o in zip(s.fields, s.spatial, spatial_out):
        r = i / o
        extra = 0 if mode.startswith("nearest") else f.jump
        fields.append(Field(f.size + extra, f.jump * r, f.start + (0.5 * r - 0.5) * f.jump))
    return Support(m, out, s.dims, tuple(fields))


# -- where the spatial path may end ----------------------------------------------------------------
def linear(op: Op) -> Any:
    """A linear layer (module or F.linear): END over a spatial axis; over channels-last features
    each output mixes all channels (the mean of their maps)."""
    s = op.s
    if len(s.shape) - 1 in s.dims or op.out is None:
        return END
    return s.with_map(s.map.mean(-1, keepdim=True), op.out)


def reshape(op: Op) -> Any:
    """flatten / view / reshape / unflatten (nn.Flatten too): the map follows a reshape of the
    channels that keeps the trailing spatial axes; END where the spatial axes are flattened or mixed."""
    s, out = op.s, op.out
    d = len(s.dims)
    trailing = s.dims == tuple(range(len(s.shape) - d, len(s.shape)))
    if out is None or not trailing or len(out) < d + 1 or tuple(out[-d:]) != s.spatial:
        return END
    if all(n == 1 for n in s.map.shape[1:-d]):
        m = s.map.reshape((s.map.shape[0],) + (1,) * (len(out) - 1 - d) + s.spatial)
    else:
        m = s.full().reshape(out)
    return Support(m, out, tuple(range(len(out) - d, len(out))), s.fields)


def reduce(op: Op) -> Any:
    """mean / sum / amax ... over dim: END over a spatial axis, else the mean of the maps reduced."""
    s = op.s
    axes = _axes(op.arg(1, "dim"), len(s.shape))
    keep = op.arg(2, "keepdim", False)
    if any(a in s.dims for a in axes):
        return END
    m = s.map.mean(axes, keepdim=True)
    if not keep:
        m = m.squeeze(axes)
    dims = s.dims if keep else tuple(d - sum(a < d for a in axes) for d in s.dims)
    return Support(m, op.out, dims, s.fields)


# -- moving axes -------------------------------------------------------------------------------------
def permute(op: Op) -> Support:
    """x.permute(*dims) / torch.permute(x, dims)."""
    rest = op.args[1:]
    perm = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest or op.kwargs["dims"])
    return _permuted(op, perm)


def transpose(op: Op) -> Support:
    """transpose / swapaxes(x, a, b)."""
    rank = len(op.s.shape)
    a, b = op.args[1] % rank, op.args[2] % rank
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return _permuted(op, perm)


def movedim(op: Op) -> Support:
    """movedim(x, source, destination) with one axis each."""
    rank = len(op.s.shape)
    src, dst = op.args[1:]
    perm = list(range(rank))
    perm.insert(dst % rank, perm.pop(src % rank))
    return _permuted(op, perm)


def _permuted(op: Op, perm: List[int]) -> Support:
    """The map permuted like the tensor; the spatial axes' positions follow, their fields stay."""
    s = op.s
    perm = [p % len(s.shape) for p in perm]
    return Support(s.map.permute(perm), op.out, tuple(perm.index(d) for d in s.dims), s.fields)


# -- joining and splitting branches --------------------------------------------------------------------
def cat(op: Op) -> Support:
    """cat(tensors, dim) along a non-spatial axis: the maps side by side, their fields united."""
    tensors, dim = op.args[0], op.arg(1, "dim", 0)
    parts = [t for t in tensors if isinstance(t, Support)]
    if len(parts) != len(tensors):
        raise GraphError("concatenation of a spatial map with a tensor that is not one")
    first = parts[0]
    axis = dim % len(first.shape)
    if axis in first.dims:
        raise GraphError("concatenation along a spatial axis has no receptive-field rule")
    maps = []
    for p in parts:
        if p.dims != first.dims or p.spatial != first.spatial:
            raise GraphError(f"concatenated branches have spatial shapes {list(first.spatial)} and {list(p.spatial)}")
        maps.append(p.map.expand([n if i != axis else p.shape[axis] for i, n in enumerate(p.map.shape)]))
    fields = tuple(union(fs) for fs in zip(*(p.fields for p in parts)))
    return Support(torch.cat(maps, axis), op.out, first.dims, fields)


def split(op: Op) -> Tuple[Support, ...]:
    """chunk / split / tensor_split along a non-spatial axis: a tuple of Supports, one per piece."""
    s = op.s
    axis = op.arg(2, "dim", 0) % len(s.shape)
    if axis in s.dims:
        raise GraphError("splitting along a spatial axis has no receptive-field rule")
    shapes = [(op.batch,) + tuple(m[1:]) for m in op.meta]
    if s.map.shape[axis] == 1:
        return tuple(s.with_map(s.map, shape) for shape in shapes)
    pieces = torch.split(s.map, [shape[axis] for shape in shapes], dim=axis)
    return tuple(s.with_map(p, shape) for p, shape in zip(pieces, shapes))


def getitem(op: Op) -> Any:
    """obj[index]: an element of a tuple (split's pieces, a shape); on a Support, ints and slices of
    non-spatial axes (whole spatial axes only)."""
    obj, index = op.args[0], op.args[1]
    if isinstance(obj, (tuple, list)):
        return obj[index]
    s: Support = obj
    idx = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in idx):
        e = idx.index(Ellipsis)
        idx = idx[:e] + (slice(None),) * (len(s.shape) - len(idx) + 1) + idx[e + 1:]
    whole = slice(None)
    for axis, i in enumerate(idx):
        if axis in s.dims and i != whole:
            raise GraphError("indexing a spatial axis has no receptive-field rule")
        if not isinstance(i, (slice, int)):
            raise GraphError(f"indexing with {type(i).__name__} has no receptive-field rule")
    expand = list(s.map.shape)
    for axis, i in enumerate(idx):
        if i != whole and s.map.shape[axis] == 1 and s.shape[axis] != 1:
            expand[axis] = s.shape[axis]
    m = s.map.expand(expand)[idx]
    removed = [axis for axis, i in enumerate(idx) if isinstance(i, int)]
    return Support(m, op.out, tuple(d - sum(r < d for r in removed) for d in s.dims), s.fields)


def pad(op: Op) -> Support:
    """F.pad(x, pad, mode) of a channels-first tensor: the map padded alike (constant: zeros, outside
    every crop), each field's centre shifted by the left padding."""
    s, widths, mode = op.s, op.arg(1, "pad"), op.arg(2, "mode", "constant")
    if not s.channels_first():
        raise GraphError("padding a channels-last tensor has no receptive-field rule")
    fields = list(s.fields)
    for j in range(len(widths) // 2):
        axis = len(fields) - 1 - j  # F.pad lists the last axis first
        if axis >= 0:
            f = fields[axis]
            fields[axis] = Field(f.size, f.jump, f.start - widths[2 * j] * f.jump)
    m = F.pad(s.map.float(), list(widths)) if mode == "constant" else F.pad(s.map.float(), list(widths), mode=mode)
    return Support(m, op.out, s.dims, tuple(fields))
