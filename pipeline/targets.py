"""Which class each map explains: `target=pred | <int> | topk:<k>`."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TargetSpec:
    mode: str  # "pred" | "index" | "topk"
    value: int = 1  # class index for "index", k for "topk"

    @classmethod
    def parse(cls, text: str | int) -> "TargetSpec":
        text = str(text).strip()
        if text == "pred":
            return cls("pred")
        if text.isdigit():
            return cls("index", int(text))
        if text.startswith("topk:") and text[5:].isdigit() and int(text[5:]) >= 1:
            return cls("topk", int(text[5:]))
        raise ValueError(f"target={text!r}: expected pred, a class index, or topk:<k>")

    @property
    def k(self) -> int:
        """Targets per input (the K axis of per-target maps)."""
        return self.value if self.mode == "topk" else 1

    def check(self, num_classes: int) -> None:
        if self.mode == "index" and not 0 <= self.value < num_classes:
            raise ValueError(f"target={self.value} is outside the model's {num_classes} classes")
        if self.mode == "topk" and self.value > num_classes:
            raise ValueError(f"target=topk:{self.value} exceeds the model's {num_classes} classes")

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [N, classes] -> class indices [N, K]."""
        if self.mode == "index":
            return torch.full((logits.shape[0], 1), self.value, dtype=torch.long, device=logits.device)
        return logits.detach().topk(self.k, dim=1).indices
