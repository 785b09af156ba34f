"""A mixin for techniques that need the model's theoretical receptive fields (erf, dataset_examples).
Not a technique."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

from pipeline.rf import Support, SupportGraph


class TracesFields:
    """Keeps the LoadedModel given to setup() and traces the chosen layers' supports from it (or
    from the bare module, for standalone use)."""

    _loaded = None

    def setup(self, model) -> None:
        self._loaded = model

    def layer_supports(self, model, layers: Sequence[str]) -> Tuple[Dict[str, Support], torch.Tensor]:
        """({layer: Support}, the example input [1, 3, H, W] they are for); raises GraphError for a
        model that cannot be traced."""
        device = next(model.parameters()).device
        loaded = self._loaded if self._loaded is not None and self._loaded.module is model else None
        example = loaded.example(device) if loaded else torch.zeros(1, 3, 224, 224, device=device)
        graph = loaded.support_graph() if loaded else SupportGraph(model, example)
        with torch.no_grad():
            values = graph.propagate(torch.zeros((1, 1) + graph.input_shape[1:], device=device), layers)
        return {k: v for k, v in values.items() if isinstance(v, Support)}, example
