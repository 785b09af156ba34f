"""Composable objectives (after Lucid / Lucent), all to be MAXIMIZED.

An objective maps (acts {layer: [B, C, h, w]}, logits [B, classes], image [B, 3, H, W] in pixel
space [0, 1]) to a per-row tensor [B]. They compose: `channel("relu2", 3) + 0.1 * l2()`, `a - b`,
`-a`, `2 * a`. The penalties `l1`, `l2`, `total_variation` return MINUS the penalty, so adding
them to a channel or class objective regularizes it.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple, Union

import torch

Ids = Union[int, torch.Tensor]  # one id for every row, or [B] ids, one per row


class Objective:
    """`layers`: the activations it reads; `needs_logits`: whether it reads the logits (if not, the
    optimize loop stops each forward pass after the last layer it needs)."""

    def __init__(self, fn: Callable[..., torch.Tensor], layers: Tuple[str, ...] = (), name: str = "",
                 needs_logits: bool = False):
        self.fn, self.layers, self.name, self.needs_logits = fn, tuple(layers), name, needs_logits

    def __call__(self, acts: Dict[str, torch.Tensor], logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.fn(acts, logits, image)

    def __add__(self, other: "Objective") -> "Objective":
        if isinstance(other, (int, float)):
            return Objective(lambda a, l, i: self(a, l, i) + other, self.layers, f"{self.name} + {other}",
                             self.needs_logits)
        return Objective(lambda a, l, i: self(a, l, i) + other(a, l, i),
                         tuple(dict.fromkeys(self.layers + other.layers)), f"{self.name} + {other.name}",
                         self.needs_logits or other.needs_logits)

    def __radd__(self, other):  # sum([...]) starts from 0
        return self if isinstance(other, (int, float)) and other == 0 else self + other

    def __mul__(self, k: float) -> "Objective":
        return Objective(lambda a, l, i: k * self(a, l, i), self.layers, f"{k} * {self.name}", self.needs_logits)

    __rmul__ = __mul__

    def __neg__(self) -> "Objective":
        return -1 * self

    def __sub__(self, other: "Objective") -> "Objective":
        return self + (-other)

    def __repr__(self) -> str:
        return f"Objective({self.name})"


def _per_row(ids: Ids, rows: int, device) -> torch.Tensor:
    ids = torch.as_tensor(ids, device=device, dtype=torch.long)
    return ids.expand(rows) if ids.dim() == 0 else ids


def channel(layer: str, c: Ids) -> Objective:
    """Mean activation of channel c (or c[b] for row b) of `layer` [B, C, h, w] -> [B]."""
    def fn(acts, logits, image):
        a = acts[layer]
        rows = torch.arange(a.shape[0], device=a.device)
        return a[rows, _per_row(c, a.shape[0], a.device)].flatten(1).mean(1)
    return Objective(fn, (layer,), f"channel({layer}, {c})")


def neuron(layer: str, c: Ids) -> Objective:
    """Activation of channel c (or c[b]) of `layer` at the centre position -> [B]."""
    def fn(acts, logits, image):
        a = acts[layer]
        rows = torch.arange(a.shape[0], device=a.device)
        return a[rows, _per_row(c, a.shape[0], a.device), a.shape[2] // 2, a.shape[3] // 2]
    return Objective(fn, (layer,), f"neuron({layer}, {c})")


def class_logit(c: Ids) -> Objective:
    """Pre-softmax logit of class c (or c[b]) -> [B]."""
    def fn(acts, logits, image):
        return logits.gather(1, _per_row(c, logits.shape[0], logits.device)[:, None])[:, 0]
    return Objective(fn, (), f"class_logit({c})", needs_logits=True)


def l1(coeff: float = 1.0, centre: float = 0.5) -> Objective:
    """-coeff * mean |image - centre| per row (a penalty: added, it pulls towards grey)."""
    return Objective(lambda a, l, i: -coeff * (i - centre).abs().flatten(1).mean(1), (), f"l1({coeff})")


def l2(coeff: float = 1.0, centre: float = 0.5) -> Objective:
    """-coeff * mean (image - centre)^2 per row."""
    return Objective(lambda a, l, i: -coeff * (i - centre).square().flatten(1).mean(1), (), f"l2({coeff})")


def total_variation(coeff: float = 1.0) -> Objective:
    """-coeff * mean |neighbour differences| per row (a smoothness penalty)."""
    def fn(acts, logits, i):
        dy = (i[:, :, 1:] - i[:, :, :-1]).abs().flatten(1).mean(1)
        dx = (i[..., 1:] - i[..., :-1]).abs().flatten(1).mean(1)
        return -coeff * (dx + dy)
    return Objective(fn, (), f"total_variation({coeff})")
