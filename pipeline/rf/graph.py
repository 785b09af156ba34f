"""A CNN's graph traced with torch.fx and run on support maps instead of features.

`SupportGraph(model, example)` traces the model once (convolution and pooling modules kept whole,
everything else traced through, so ResNet, MobileNet, EfficientNet, VGG, DenseNet, Inception ...
all work), runs it once on `example` to record every tensor's shape, then `propagate(mask)` pushes
crop masks [B, 1, *spatial] through it. How each operation treats the maps (see README):

  convolution, pooling     an averaging box filter of the same kernel, stride, padding, dilation and
                           groups; padding counts as zeros (outside every crop)
  activation, norm, dropout, scaling by a constant, reshaping the channels: the map passes unchanged
  sum / difference / product of branches: the mean of their maps (the union of their fields)
  concatenation along channels: the maps are kept per channel
  global pool, linear layer over a spatial axis, flattening the spatial axes: the spatial path ends
                           (END); a branch that ended is ignored where it meets a spatial one
                           (a squeeze-excite gate scales x: x's map passes)
  adaptive pool to a grid, interpolation: the same operation on the map

An operation outside these rules, or a module the tracer cannot trace, raises `GraphError`
naming the module.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_aggregate

from pipeline.rf.support import END, Field, Support, box, merge, union

GEOMETRY = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
            nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
PASS_MODULES = (nn.Identity, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                nn.modules.dropout._DropoutNd, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
                nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.Softmax2d)
POINTWISE = {
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish",
    "hardsigmoid", "hardtanh", "hardtanh_", "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "softsign",
    "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "abs", "neg", "exp", "log", "sqrt", "rsqrt", "pow",
    "square", "reciprocal", "dropout", "dropout2d", "dropout3d", "alpha_dropout", "batch_norm", "layer_norm",
    "group_norm", "instance_norm", "local_response_norm", "stochastic_depth", "drop_path", "contiguous",
    "float", "half", "double", "to", "type", "type_as", "clone", "detach", "identity",
    # elementwise ops of two tensors: several spatial branches are averaged (`merge`)
    "add", "add_", "iadd", "sub", "sub_", "isub", "mul", "mul_", "imul", "truediv", "div", "div_",
    "itruediv", "maximum", "minimum", "where", "addcmul",
}
REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "norm"}
SHAPE_QUERY = {"size", "dim"}


class GraphError(ValueError):
    """The model cannot be traced, or an operation has no receptive-field rule."""


class _Tracer(fx.Tracer):
    """Keeps convolution and pooling modules (subclasses included, e.g. timm's Conv2dSame) whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, GEOMETRY) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """torch.fx graph of `model` (which is not changed); GraphError names the module that failed."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure becomes one clear error
        stack = list(getattr(tracer, "module_stack", {}).values())
        where = stack[-1] if stack else None
        path, kind = (where if isinstance(where, tuple) else (where, None)) if where else ("<model>", type(model))
        name = getattr(kind, "__name__", type(model).__name__)
        raise GraphError(f"torch.fx cannot trace module {path or '<model>'!r} ({name}) of "
                         f"{type(model).__name__}: {type(err).__name__}: {err}") from None
    return fx.GraphModule(model, graph)


def _scope(node: fx.Node) -> List[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] if isinstance(v, tuple) else k for k, v in stack.items()]


def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _tuple(v, d: int) -> Tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d


def _shape(meta) -> Optional[Tuple[int, ...]]:
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _axes(dim, rank: int) -> Tuple[int, ...]:
    if dim is None:
        return tuple(range(rank))
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return tuple(sorted(d % rank for d in dims))


class SupportGraph:
    """The traced model with every tensor's shape for one input size; see the module docstring."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.model = model
        self.gm = trace(model)
        self.modules = dict(self.gm.named_modules())
        self.nodes = list(self.gm.graph.nodes)
        self.input_shape = tuple(example.shape[1:])
        with torch.no_grad():
            self._record(example[:1])
        self.layer_nodes = self._layer_nodes()

    # -- setup ------------------------------------------------------------------------------
    def _record(self, example: torch.Tensor) -> None:
        """Run the real graph once, keeping each node's output shape (tensors) or value (sizes)."""
        self.meta: Dict[fx.Node, Any] = {}
        interp = fx.Interpreter(self.gm)
        env = interp.env
        args = iter([example])
        for node in self.nodes:
            if node.op == "placeholder":
                value = next(args, None)
            elif node.op == "output":
                break
            else:
                value = interp.run_node(node)
            env[node] = value
            self.meta[node] = map_aggregate(value, lambda v: torch.Size(v.shape) if torch.is_tensor(v) else v)

    def _layer_nodes(self) -> Dict[str, fx.Node]:
        """Module name -> the node that gives its output (the last tensor node in its scope)."""
        out: Dict[str, fx.Node] = {}
        for node in self.nodes:
            if not isinstance(self.meta.get(node), torch.Size):
                continue
            for path in _scope(node):
                out[path] = node
            if node.op == "call_module":
                out[node.target] = node
        return out

    def node(self, layer: str) -> fx.Node:
        try:
            return self.layer_nodes[layer]
        except KeyError:
            raise GraphError(f"layer {layer!r} gives no tensor in the traced graph") from None

    def geometry_layers(self, upto: Sequence[str]) -> List[str]:
        """Every convolution and pooling module that feeds one of `upto`, in graph order."""
        needed = self._ancestors([self.node(layer) for layer in upto])
        return [n.target for n in self.nodes
                if n in needed and n.op == "call_module" and isinstance(self.modules[n.target], GEOMETRY)]

    def _ancestors(self, targets: Iterable[fx.Node]) -> set:
        seen, todo = set(), list(targets)
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(n.all_input_nodes)
        return seen

    # -- propagation ------------------------------------------------------------------------
    def input_support(self, mask: torch.Tensor) -> Support:
        """mask [B, 1, *spatial] (1 inside the crop) -> the Support of the model input."""
        d = mask.dim() - 2
        shape = (mask.shape[0],) + self.input_shape
        if tuple(mask.shape[2:]) != self.input_shape[1:]:
            raise ValueError(f"mask {list(mask.shape)} does not match the input {list(shape)}")
        return Support(mask, shape, tuple(range(2, 2 + d)), tuple(Field(1.0, 1.0, 0.0) for _ in range(d)))

    def propagate(self, mask: torch.Tensor, layers: Sequence[str]) -> Dict[str, Any]:
        """{layer: Support or END} for each of `layers` (module names), from mask [B, 1, *spatial];
        only the part of the graph that feeds them runs. Differentiable in `mask`."""
        targets = {layer: self.node(layer) for layer in layers}
        needed = self._ancestors(targets.values())
        last = max(self.nodes.index(n) for n in targets.values())
        interp = _SupportInterpreter(self, mask.shape[0])
        env = interp.env
        for node in self.nodes[: last + 1]:
            if node not in needed:
                continue
            if node.op == "placeholder":
                env[node] = self.input_support(mask)
            else:
                env[node] = interp.run_node(node)
        return {layer: env[n] for layer, n in targets.items()}

    def fields(self) -> Dict[str, Optional[Tuple[Field, ...]]]:
        """{module name: fields of its output, or None where the spatial path has ended}."""
        mask = torch.zeros((1, 1) + self.input_shape[1:])
        with torch.no_grad():
            values = self.propagate(mask, list(self.layer_nodes))
        return {layer: v.fields if isinstance(v, Support) else None for layer, v in values.items()}


class _SupportInterpreter(fx.Interpreter):
    """Runs nodes with the rules of the module docstring wherever a Support flows in."""

    def __init__(self, sg: SupportGraph, batch: int):
        super().__init__(sg.gm, garbage_collect_values=False)
        self.sg, self.batch = sg, batch

    def shape(self, node: fx.Node) -> Optional[Tuple[int, ...]]:
        meta = self.sg.meta.get(node)
        return (self.batch,) + tuple(meta[1:]) if isinstance(meta, torch.Size) and len(meta) else None

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "get_attr", "output"):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        flat: List[Any] = []
        map_aggregate((args, kwargs), flat.append)
        supports = [v for v in flat if isinstance(v, Support)]
        if not supports:
            if any(v is END for v in flat):
                return END
            return super().run_node(n)
        try:
            return self.rule(n, args, kwargs, supports)
        except GraphError:
            raise
        except Exception as err:  # noqa: BLE001 - name the module where it failed
            where = (_scope(n) or ["<model>"])[-1]
            raise GraphError(f"receptive fields: {_name(n)} in module {where!r}: {err}") from None

    # -- the rules --------------------------------------------------------------------------
    def rule(self, n: fx.Node, args, kwargs, supports: List[Support]) -> Any:
        name = _name(n)
        out = self.shape(n)
        if n.op == "call_module":
            return self.module_rule(n, self.sg.modules[n.target], supports[0], out)
        s = args[0] if args and isinstance(args[0], Support) else supports[0]
        if name == "getattr":
            attr = args[1]
            if attr == "shape":
                return torch.Size(s.shape)
            if attr == "ndim":
                return len(s.shape)
            return getattr(torch.empty(0), attr)  # dtype, device, ...: as the real tensor's
        if name in SHAPE_QUERY:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if name == "dim":
                return len(s.shape)
            return torch.Size(s.shape) if dim is None else s.shape[dim]
        if name in POINTWISE:
            return merge(supports, out or s.shape)
        if name == "getitem":
            return self.getitem(args[0], args[1], out)
        if name in ("conv1d", "conv2d", "conv3d"):
            return self.functional_conv(s, args, kwargs, out)
        if name in ("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices"):
            return self.functional_pool(name, s, args, kwargs, out)
        if name.startswith("adaptive_"):
            return self.adaptive(s, out)
        if name in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"):
            return self.interpolate(s, out, kwargs.get("mode", args[3] if len(args) > 3 else "nearest"))
        if name == "linear":
            return self.linear(s, out)
        if name in ("flatten", "view", "reshape", "unflatten"):
            return self.reshape(s, out)
        if name in ("permute", "transpose", "swapaxes", "movedim"):
            return self.permute(name, s, args[1:], kwargs, out)
        if name in REDUCE:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            return self.reduce(s, dim, keep, out)
        if name in ("cat", "concat", "concatenate"):
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            return self.cat(args[0], dim, out)
        if name in ("chunk", "split", "tensor_split"):
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            return self.split(s, dim, n)
        if name == "pad":
            return self.pad(s, args, kwargs, out)
        if name == "softmax" or name == "log_softmax":
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if dim is not None and dim % len(s.shape) in s.dims:
                raise GraphError(f"{name} over a spatial axis has no receptive-field rule")
            return s.with_map(s.map, out)
        where = (_scope(n) or ["<model>"])[-1]
        raise GraphError(f"receptive fields: no rule for {name!r} ({n.op}) in module {where!r}; "
                         "see pipeline/rf/graph.py for the operations it knows")

    def module_rule(self, n: fx.Node, m: nn.Module, s: Support, out) -> Any:
        if isinstance(m, nn.modules.conv._ConvNd):
            if m.transposed:
                raise GraphError(f"transposed convolution {n.target!r} has no receptive-field rule")
            return box(s, m.kernel_size, m.stride, m.dilation, _tuple(m.padding, len(m.kernel_size)),
                       out[2:], groups=m.groups, out_channels=m.out_channels, padding_mode=m.padding_mode)
        if isinstance(m, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
            d = len(s.dims)
            k = _tuple(m.kernel_size, d)
            stride = _tuple(m.stride or m.kernel_size, d)
            dilation = _tuple(getattr(m, "dilation", 1), d)
            return box(s, k, stride, dilation, _tuple(m.padding, d), out[2:], mix_channels=False,
                       ceil_mode=m.ceil_mode)
        if isinstance(m, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
            return self.adaptive(s, out)
        if isinstance(m, nn.Linear):
            return self.linear(s, out)
        if isinstance(m, nn.Flatten):
            return self.reshape(s, out)
        if isinstance(m, nn.Upsample):
            return self.interpolate(s, out, m.mode)
        if isinstance(m, PASS_MODULES):
            return s.with_map(s.map, out)
        raise GraphError(f"receptive fields: no rule for module {n.target!r} ({type(m).__name__})")

    def functional_conv(self, s: Support, args, kwargs, out) -> Support:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        a = dict(zip(names, args), **kwargs)
        w = a["weight"]
        d = w.dim() - 2
        return box(s, tuple(w.shape[2:]), _tuple(a.get("stride", 1), d), _tuple(a.get("dilation", 1), d),
                   _tuple(a.get("padding", 0), d), out[2:], groups=a.get("groups", 1), out_channels=w.shape[0])

    def functional_pool(self, name: str, s: Support, args, kwargs, out) -> Support:
        if name.startswith("max"):
            names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
        else:
            names = ("input", "kernel_size", "stride", "padding", "ceil_mode")
        a = dict(zip(names, args), **kwargs)
        d = len(s.dims)
        k = _tuple(a["kernel_size"], d)
        stride = _tuple(a.get("stride") or a["kernel_size"], d)
        out_s = out[2:] if out else None
        if out_s is None:  # with_indices returns a tuple: take the values' shape
            raise GraphError(f"{name}: cannot tell its output shape")
        return box(s, k, stride, _tuple(a.get("dilation", 1), d), _tuple(a.get("padding", 0), d), out_s,
                   mix_channels=False, ceil_mode=bool(a.get("ceil_mode", False)))

    def adaptive(self, s: Support, out) -> Any:
        spatial_out = out[2:]
        if all(o == 1 for o in spatial_out):
            return END  # a global pool ends the spatial path
        d = len(s.dims)
        m = s.map.float()
        pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[d]
        fields = []
        for f, i, o in zip(s.fields, s.spatial, spatial_out):
            k = math.ceil(i / o)
            fields.append(Field(f.size + (k + (i % o != 0) - 1) * f.jump, f.jump * i / o, f.start + (k - 1) / 2 * f.jump))
        return Support(pool(m, spatial_out), out, s.dims, tuple(fields))

    def interpolate(self, s: Support, out, mode: str) -> Support:
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

    def linear(self, s: Support, out) -> Any:
        last = len(s.shape) - 1
        if last in s.dims or out is None:
            return END  # a linear layer over a spatial (or flattened) axis
        m = s.map.mean(-1, keepdim=True)  # channels-last features: each output mixes all channels
        return s.with_map(m, out)

    def reshape(self, s: Support, out) -> Any:
        d = len(s.dims)
        trailing = s.dims == tuple(range(len(s.shape) - d, len(s.shape)))
        if out is None or not trailing or len(out) < d + 1 or tuple(out[-d:]) != s.spatial:
            return END  # the spatial axes are flattened or mixed
        if all(size == 1 for size in s.map.shape[1:-d]):
            m = s.map.reshape((s.map.shape[0],) + (1,) * (len(out) - 1 - d) + s.spatial)
        else:
            m = s.full().reshape(out)
        return Support(m, out, tuple(range(len(out) - d, len(out))), s.fields)

    def permute(self, name: str, s: Support, rest, kwargs, out) -> Support:
        rank = len(s.shape)
        if name == "permute":
            perm = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest or kwargs["dims"])
        elif name == "movedim":
            src, dst = rest
            order = list(range(rank))
            order.insert(dst % rank, order.pop(src % rank))
            perm = order
        else:
            a, b = (rest[0] % rank, rest[1] % rank)
            perm = list(range(rank))
            perm[a], perm[b] = perm[b], perm[a]
        perm = [p % rank for p in perm]
        dims = tuple(perm.index(d) for d in s.dims)
        return Support(s.map.permute(perm), out, dims, s.fields)

    def reduce(self, s: Support, dim, keep: bool, out) -> Any:
        rank = len(s.shape)
        axes = _axes(dim, rank)
        if any(a in s.dims for a in axes):
            return END  # a reduction over space (e.g. x.mean((2, 3))) ends the spatial path
        m = s.map.mean(axes, keepdim=True)
        if not keep:
            m = m.squeeze(axes)
        dims = tuple(d - sum(a < d for a in axes) for d in s.dims) if not keep else s.dims
        return Support(m, out, dims, s.fields)

    def cat(self, tensors, dim: int, out) -> Any:
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
            maps.append(p.map.expand([size if i != axis else p.shape[axis] for i, size in enumerate(p.map.shape)]))
        fields = tuple(union(fs) for fs in zip(*(p.fields for p in parts)))
        return Support(torch.cat(maps, axis), out, first.dims, fields)

    def split(self, s: Support, dim: int, n: fx.Node) -> Tuple[Support, ...]:
        axis = dim % len(s.shape)
        if axis in s.dims:
            raise GraphError("splitting along a spatial axis has no receptive-field rule")
        shapes = [(self.batch,) + tuple(m[1:]) for m in self.sg.meta[n]]
        if s.map.shape[axis] == 1:
            return tuple(s.with_map(s.map, shape) for shape in shapes)
        pieces = torch.split(s.map, [shape[axis] for shape in shapes], dim=axis)
        return tuple(s.with_map(p, shape) for p, shape in zip(pieces, shapes))

    def getitem(self, obj, index, out) -> Any:
        if isinstance(obj, (tuple, list)):
            return obj[index]
        s: Support = obj
        idx = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in idx):
            e = idx.index(Ellipsis)
            idx = idx[:e] + (slice(None),) * (len(s.shape) - len(idx) + 1) + idx[e + 1:]
        full_slice = slice(None)
        for axis, i in enumerate(idx):
            if axis in s.dims and i != full_slice:
                raise GraphError("indexing a spatial axis has no receptive-field rule")
            if not isinstance(i, (slice, int)):
                raise GraphError(f"indexing with {type(i).__name__} has no receptive-field rule")
        m = s.map
        expand = list(m.shape)
        for axis, i in enumerate(idx):
            if i != full_slice and m.shape[axis] == 1 and s.shape[axis] != 1:
                expand[axis] = s.shape[axis]
        m = m.expand(expand)[idx]
        removed = [axis for axis, i in enumerate(idx) if isinstance(i, int)]
        dims = tuple(d - sum(r < d for r in removed) for d in s.dims)
        return Support(m, out, dims, s.fields)

    def pad(self, s: Support, args, kwargs, out) -> Support:
        pad = args[1] if len(args) > 1 else kwargs["pad"]
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        if not s.channels_first():
            raise GraphError("padding a channels-last tensor has no receptive-field rule")
        fields = list(s.fields)
        for j in range(len(pad) // 2):
            axis = len(fields) - 1 - j  # F.pad lists the last axis first
            if axis >= 0:
                f = fields[axis]
                fields[axis] = Field(f.size, f.jump, f.start - pad[2 * j] * f.jump)
        m = F.pad(s.map.float(), list(pad)) if mode == "constant" else F.pad(s.map.float(), list(pad), mode=mode)
        return Support(m, out, s.dims, tuple(fields))

