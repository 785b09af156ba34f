"""`Preprocess`: how an image becomes the model's input. A module of its own, free of torch and
timm, so that decoder worker processes can import it cheaply (pipeline.models re-exports it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input: resize the shorter side, centre-crop, normalise."""

    input_size: int
    resize: int
    interpolation: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
