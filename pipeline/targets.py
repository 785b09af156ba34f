"""Which class each map explains: `target=pred | <int> | topk:<k> | "<class name>"`."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class TargetSpec:
    mode: str  # "pred" | "index" | "topk"
    value: int = 1  # class index for "index", k for "topk"

    @classmethod
    def parse(cls, text: str | int, class_names: Optional[Sequence[str]] = None) -> "TargetSpec":
        """pred, a class index, topk:<k>, or a class name looked up in `class_names`
        (case-insensitive); an unknown name raises ValueError listing the closest names."""
        text = str(text).strip()
        if text == "pred":
            return cls("pred")
        if text.isdigit():
            return cls("index", int(text))
        if text[:1] in "+-" and text[1:].isdigit():  # a signed index: never a class name
            value = int(text)
            if value < 0:
                span = f"0..{len(class_names) - 1}" if class_names else "0..N-1 (N: the model's classes)"
                raise ValueError(f"target={value}: a class index is {span}; negative indices are not classes")
            return cls("index", value)
        if text.startswith("topk:"):
            if text[5:].isdigit() and int(text[5:]) >= 1:
                return cls("topk", int(text[5:]))
            raise ValueError(f"target={text!r}: topk needs a whole number >= 1, e.g. topk:3")
        if not class_names:
            raise ValueError(f"target={text!r}: expected pred, a class index or topk:<k> "
                             "(this model has no class names to look a name up in)")
        lowered = [name.lower() for name in class_names]
        if text.lower() in lowered:
            return cls("index", lowered.index(text.lower()))
        close = difflib.get_close_matches(text.lower(), lowered, n=5, cutoff=0.5)
        close += [n for n in lowered if text.lower() in n and n not in close][: 5 - len(close)]
        names = ", ".join(repr(class_names[lowered.index(c)]) for c in close)
        raise ValueError(f"target={text!r} is not a class name of this model; closest: {names or 'none'}")

    @property
    def k(self) -> int:
        """Targets per input (the K axis of per-target maps)."""
        return self.value if self.mode == "topk" else 1

    def check(self, num_classes: int) -> None:
        if self.mode == "index" and not 0 <= self.value < num_classes:
            raise ValueError(f"target={self.value} is outside the model's {num_classes} classes "
                             f"(indices 0..{num_classes - 1})")
        if self.mode == "topk" and self.value > num_classes:
            raise ValueError(f"target=topk:{self.value} exceeds the model's {num_classes} classes")

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [N, classes] -> class indices [N, K]."""
        if self.mode == "index":
            return torch.full((logits.shape[0], 1), self.value, dtype=torch.long, device=logits.device)
        return logits.detach().topk(self.k, dim=1).indices
