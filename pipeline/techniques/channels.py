"""Channel choices shared by the dataset-level techniques (dataset_examples, channel_relevance):
`channels=all | a-b | 0-3,7 | [c, ...]`, with filter_vis's syntax. Not a technique."""
from __future__ import annotations

from typing import Any, List, Optional

from pipeline.techniques.filter_vis import parse_channels as parse_channel_list


def parse_channels(spec: Any, count: Optional[int] = None, layer: Optional[str] = None) -> List[int]:
    """"all", "a-b", "0-3,7", an int or a list of ints -> the channel ids, sorted, each once.
    With `count` (the layer's channels) an id out of range raises a ValueError naming `layer`;
    "all" needs `count`."""
    try:
        return sorted(set(parse_channel_list(spec, count)))
    except ValueError as err:
        if layer is None:
            raise
        raise ValueError(f"layer {layer!r} ({count} channels): {err}") from None


def is_all(spec: Any) -> bool:
    return isinstance(spec, str) and spec.strip() == "all"
