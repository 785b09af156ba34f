"""The part of a network after one layer, run on its own (Ablation-CAM's ablated copies).

`Tail(model, layer)` traces the model once with torch.fx (pipeline.rf.graph.trace, `layer` kept
as one node) and splits the graph at the layer: `clean(x1)` runs one input [1, ...] and keeps
every node's value; `run(env, out)` runs only the nodes that depend on the layer, with the
layer's output replaced by `out` [m, ...] and every other value taken from the clean run (batch
1: broadcast, exact for elementwise use; the caller checks one unablated copy). So an ablated copy
costs the network after the layer only, and the layers before it run once per input.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate

from pipeline.techniques.incremental import Unsupported, clean_values, run_node, traced


class Tail:
    def __init__(self, model: nn.Module, layer: str):
        self.gm = traced(model, leaves=[layer])
        self.modules = dict(self.gm.named_modules())
        self.nodes = list(self.gm.graph.nodes)
        at = [n for n in self.nodes if n.op == "call_module" and n.target == layer]
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        if len(at) != 1 or len(inputs) != 1:
            raise Unsupported(f"layer {layer!r} is called {len(at)} times in the traced graph (needs once)")
        self.at, self.input = at[0], inputs[0]
        after = {self.at}
        for n in self.nodes:  # the nodes whose value depends on the layer's output
            if any(a in after for a in n.all_input_nodes):
                after.add(n)
        self.after = after

    def clean(self, x: torch.Tensor) -> Dict[fx.Node, Any]:
        """Every node's value for one input x [1, ...] (the layer's output at self.at)."""
        return clean_values(self.nodes, x, self.modules, self.gm)

    def run(self, env: Dict[fx.Node, Any], out: torch.Tensor) -> Any:
        """The model's output with the layer's output replaced by `out` [m, ...] (new tensors
        only: the clean values in env are never written)."""
        local = dict(env)
        local[self.at] = out
        for n in self.nodes:
            if n in self.after and n is not self.at:
                local[n] = self._value(n.args[0], local) if n.op == "output" else self._call(n, local)
        return local[self.nodes[-1]]

    @staticmethod
    def _value(a, env):
        return map_aggregate(a, lambda v: env[v] if isinstance(v, fx.Node) else v)

    def _call(self, n: fx.Node, env) -> Any:
        return run_node(n, self._value(n.args, env), self._value(n.kwargs, env), self.modules, self.gm)
