"""A CNN's graph traced with torch.fx and run on support maps instead of features.

`SupportGraph(model, example)` traces the model once (convolution and pooling modules kept whole,
everything else traced through, so ResNet, MobileNet, EfficientNet, VGG, DenseNet, Inception ...
all work), runs it once on `example` to record every tensor's shape, then `propagate(mask)` pushes
crop masks [B, 1, *spatial] through it: an operation with a Support among its inputs goes by its
rule in `pipeline.rf.rules` (see there, and the README, for what each rule does), one with an
`END` input (a spatial path that ended) gives END, any other runs as in the model.

A module the tracer cannot trace, or an operation without a rule, raises `GraphError` naming the
module.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate

from pipeline.rf.ops import GraphError, Op, Rule
from pipeline.rf.rules import function_rule, module_rule
from pipeline.rf.support import END, Field, Support

GEOMETRY = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
            nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)


class _Tracer(fx.Tracer):
    """Keeps convolution and pooling modules (subclasses included, e.g. timm's Conv2dSame) whole,
    and the modules named in `leaves`."""

    def __init__(self, leaves: Sequence[str] = ()):
        super().__init__()
        self.leaves = frozenset(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or isinstance(m, GEOMETRY) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, leaves: Sequence[str] = ()) -> fx.GraphModule:
    """torch.fx graph of `model` (which is not changed), the modules named in `leaves` kept whole
    (one call_module node each); GraphError names the module that failed."""
    tracer = _Tracer(leaves)
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
    """The name rules go by: a function's or method's name, or a module's path."""
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _where(node: fx.Node) -> str:
    """The innermost module whose forward made `node` ("<model>" at the top)."""
    return (_scope(node) or ["<model>"])[-1]


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
                try:
                    value = interp.run_node(node)
                except Exception as err:  # noqa: BLE001 - a traced graph that cannot run (a ViT's SDPA call)
                    raise GraphError(f"the traced graph of {type(self.model).__name__} cannot run node {node.name} "
                                     f"(in {_where(node)}): {type(err).__name__}: {err}") from None
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
    """Runs the graph on Supports: each node with a Support among its inputs by its rule."""

    def __init__(self, sg: SupportGraph, batch: int):
        super().__init__(sg.gm, garbage_collect_values=False)
        self.sg, self.batch = sg, batch

    def shape(self, node: fx.Node) -> Optional[Tuple[int, ...]]:
        """The real output's shape at this batch size; None where the node gives no tensor."""
        meta = self.sg.meta.get(node)
        return (self.batch,) + tuple(meta[1:]) if isinstance(meta, torch.Size) and len(meta) else None

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "get_attr", "output"):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        flat: List[Any] = []
        map_aggregate((args, kwargs), flat.append)
        supports = [v for v in flat if isinstance(v, Support)]
        if supports:
            return self.apply(n, self.op(n, args, kwargs, supports))
        if any(v is END for v in flat):
            return END
        return super().run_node(n)

    def op(self, n: fx.Node, args: tuple, kwargs: dict, supports: List[Support]) -> Op:
        """The call at node `n` as its rule sees it."""
        module = self.sg.modules[n.target] if n.op == "call_module" else None
        return Op(_name(n), args, kwargs, supports, self.shape(n), self.sg.meta.get(n), self.batch, module)

    def rule(self, n: fx.Node, op: Op) -> Rule:
        """The table's rule for node `n`; GraphError when it has none."""
        if op.module is not None:
            return module_rule(n.target, op.module)
        return function_rule(op.name, n.op, _where(n))

    def apply(self, n: fx.Node, op: Op) -> Any:
        """The rule's result for `op`; any failure becomes a GraphError naming the module."""
        try:
            return self.rule(n, op)(op)
        except GraphError:
            raise
        except Exception as err:  # noqa: BLE001 - name the module where it failed
            raise GraphError(f"receptive fields: {op.name} in module {_where(n)!r}: {err}") from None
