"""Which class each map explains: `target=pred | label | <int> | topk:<k> | "<class name>" | similar:PATH`.

`similar:PATH`: the one score of a model seen through pipeline.scores' similarity to the image at
PATH (column 0 of its scores [N, 1]).

`label`: each input's annotated class (data.annotations, pipeline.data.annotations), given to
the batch's Pass as explicit targets; `select` cannot choose it from the logits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from pipeline.data.annotations import close_names


@dataclass(frozen=True)
class TargetSpec:
    mode: str  # "pred" | "label" | "index" | "topk" | "similar"
    value: int = 1  # class index for "index", k for "topk"

    @classmethod
    def parse(cls, text: str | int, class_names: Optional[Sequence[str]] = None) -> "TargetSpec":
        """pred, label, a class index, topk:<k>, or a class name looked up in `class_names`
        (case-insensitive; `label` is the keyword even for a model with a class of that name);
        an unknown name raises ValueError listing the closest names."""
        text = str(text).strip()
        if text in ("pred", "label"):
            return cls(text)
        if text.startswith("similar:"):
            return cls("similar", 0)
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
        raise ValueError(f"target={text!r} is not a class name of this model; "
                         f"closest: {close_names(text, class_names) or 'none'}")

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
        """logits [N, classes] -> class indices [N, K]; target=label has no rule to choose by
        (its labels are passed as the Pass's `targets`): ValueError."""
        if self.mode == "label":
            raise ValueError("target=label: the inputs' labels must be given as explicit targets")
        if self.mode in ("index", "similar"):
            return torch.full((logits.shape[0], 1), self.value, dtype=torch.long, device=logits.device)
        return logits.detach().topk(self.k, dim=1).indices
