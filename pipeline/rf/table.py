"""The theoretical receptive field of every layer of a model: size, jump (stride) and centre."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from pipeline.rf.graph import SupportGraph


@dataclass
class FieldRow:
    layer: str
    type: str
    size: Tuple[float, ...]  # input pixels covered by one element, per spatial axis ((T,) H, W)
    jump: Tuple[float, ...]  # input pixels between neighbouring elements
    centre: Tuple[float, ...]  # input coordinate of the centre of element 0's field (pixel centres are integers)


def field_table(graph: SupportGraph) -> List[FieldRow]:
    """One row per module (named_modules order) whose output is still a spatial map."""
    fields = graph.fields()
    modules = dict(graph.model.named_modules())
    rows = []
    for name, module in modules.items():
        f = fields.get(name)
        if name and f:
            rows.append(FieldRow(name, type(module).__name__, tuple(x.size for x in f), tuple(x.jump for x in f),
                                 tuple(x.start for x in f)))
    return rows


def table_arrays(rows: List[FieldRow]) -> Dict[str, np.ndarray]:
    """Columns for maps.h5's receptive_fields group: layer, type [L] strings; size, jump, centre [L, axes]."""
    return {
        "layer": np.array([r.layer for r in rows], dtype=object),
        "type": np.array([r.type for r in rows], dtype=object),
        "size": np.array([r.size for r in rows], dtype=np.float32),
        "jump": np.array([r.jump for r in rows], dtype=np.float32),
        "centre": np.array([r.centre for r in rows], dtype=np.float32),
    }


def fmt(values: Tuple[float, ...]) -> str:
    """(35, 35) -> "35"; (35, 19) -> "35x19" (per axis, (T,) H, W)."""
    text = [f"{v:g}" for v in values]
    return text[0] if len(set(text)) == 1 else "x".join(text)
