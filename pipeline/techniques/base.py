"""Technique base class and registry.

A technique is one small class registered by name. `attribute()` is the public entry: it checks
the batch and the model state, then calls `_attribute()`, which does the maths and returns raw
tensors. Upsampling, normalisation, colouring, HDF5 and PNG live elsewhere (pipeline.io).

Each technique declares its `outputs`: output name -> how it is drawn
  "heatmap"  [N, K, h, w]      one map per target, drawn over the input
  "gradient" [N, K, 3, H, W]   a signed input-space map, drawn as colour and grey images
  "channels" [N, C, h, w]      feature maps, the top channels drawn as a grid
  "data"     any shape          stored, not drawn
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Sequence, Tuple, Type

import torch
from torch import nn

from pipeline.targets import TargetSpec

REGISTRY: Dict[str, Type["Technique"]] = {}
INPUT = "input"  # the pseudo-layer name of maps in input space


def register(name: str):
    """Class decorator: register a technique under `name` (a duplicate name raises)."""

    def wrap(cls: Type["Technique"]) -> Type["Technique"]:
        if name in REGISTRY:
            raise ValueError(f"technique {name!r} is already registered by {REGISTRY[name].__module__}")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def get_technique(name: str) -> Type["Technique"]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown technique {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


@dataclass
class Result:
    logits: torch.Tensor  # [N, classes]
    targets: torch.Tensor  # [N, K] class indices the maps explain
    maps: Dict[Tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (layer, output) -> [N, ...]


class Technique:
    name: ClassVar[str]
    outputs: ClassVar[Dict[str, str]] = {}
    uses_layers: ClassVar[bool] = True  # False: maps live in input space (layer "input")

    @dataclass
    class Options:
        pass

    def __init__(self, **options: Any):
        self.options = self.Options(**options)

    def check_layers(self, shapes: Dict[str, Tuple[int, ...] | None]) -> None:
        """Raise ValueError before any work if a chosen layer's output shape cannot be used.

        `shapes` maps each chosen layer to its output shape for one input ([1, ...]), or None
        when the output is not a tensor.
        """
        for layer, shape in shapes.items():
            if shape is None:
                raise ValueError(f"{self.name}: layer {layer!r} does not output a single tensor")

    def map_layers(self, layers: Sequence[str]) -> List[str]:
        return list(layers) if self.uses_layers else [INPUT]

    def attribute(
        self, model: nn.Module, x: torch.Tensor, layers: Sequence[str], target: TargetSpec
    ) -> Result:
        """Maps for a batch x [N, C, H, W] (or [N, C, T, H, W]); the model must be in eval mode."""
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 4:
            raise ValueError(f"{self.name}: expected a float batch [N, C, H, W], got {tuple(x.shape)}")
        if model.training:
            raise ValueError(f"{self.name}: model must be in eval mode")
        return self._attribute(model, x.detach(), list(layers), target)

    def _attribute(
        self, model: nn.Module, x: torch.Tensor, layers: List[str], target: TargetSpec
    ) -> Result:
        raise NotImplementedError


def target_scores(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over the batch of the logit of each row's k-th target (a scalar to differentiate)."""
    return logits.gather(1, targets[:, k : k + 1]).sum()
