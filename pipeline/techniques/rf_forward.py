"""Receptive-field contribution maps, forward: the fraction of each unit's input support inside a crop.

Every convolution and pooling layer becomes an averaging box filter of the same geometry (see
pipeline/rf/rules.py for the rules at activations, merges and pools), so a mask that is 1 inside
the crop and 0 outside becomes, at each layer, the fraction of each element's support in the crop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from pipeline.contracts import Display, Draw, Family, Kind, Output, Scale
from pipeline.rf import END, GraphError, Support, SupportGraph
from pipeline.rf.crops import Box, box_masks, centre_box, check_inside, parse_boxes
from pipeline.techniques.base import Technique, register

DISPLAY = tuple(d.value for d in Display)  # the `display` option's values


def spatial_map(s: Support, reduce: str = "mean") -> torch.Tensor:
    """Support -> [B, *spatial]: the mean (or sum) over channels and any other non-spatial axis."""
    m = s.map
    rest = [a for a in range(1, m.dim()) if a not in s.dims]
    if rest:
        m = m.mean(rest, keepdim=True) if reduce == "mean" else m.sum(rest, keepdim=True)
    return m.permute(0, *s.dims, *rest).reshape(m.shape[0], *s.spatial).float()


def field_label(s: Optional[Support]) -> str:
    if not isinstance(s, Support):
        return ""
    sizes = [f"{f.size:g}" for f in s.fields]
    return "RF " + (sizes[0] if len(set(sizes)) == 1 else "x".join(reversed(sizes)))


class SupportMaps(Technique):
    """Shared base of rf_forward, rf_ratio and rf_backward: the traced graph, the layers drawn (every
    convolution and pooling layer feeding the chosen layers, then the chosen layers) and the crops.
    The maps do not depend on the pixels, so they are computed once per input size and repeated
    for each input. Returns per drawn layer map [N, K, h, w], one map per crop."""

    family = Family.RF
    outputs = {"map": Output(Kind.RF, "[N, crops, h, w]", doc="per drawn layer, one map per crop")}
    torchscript = False
    video = False
    scale = Scale.FRACTION  # how the renderer scales maps: fixed [0, 1] (MAX: each map by its maximum)

    @dataclass
    class Options:
        crop: Any = None  # [x, y, w, h] in input pixels after preprocessing, or a list of boxes; null: centred quarter
        display: str = "heatmap"  # heatmap (map over the input) | weighted (input weighted by the map)

        def __post_init__(self):
            if self.display not in DISPLAY:
                raise ValueError(f"display={self.display!r}; expected one of {DISPLAY}")
            parse_boxes(self.crop, "crop")

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.graph: Optional[SupportGraph] = None
        self._loaded = None
        self._cache: Dict[Any, Dict[str, torch.Tensor]] = {}

    def setup(self, model) -> None:
        self._loaded = model  # LoadedModel: its traced graph is shared by the run's techniques

    def check_layers(self, shapes):
        super().check_layers(shapes)
        self.require_image_maps(shapes)

    def check_model(self, model, layers) -> None:
        self.prepare(model, layers)

    def prepare(self, model, layers, example: Optional[torch.Tensor] = None) -> None:
        """Trace the model (the run's LoadedModel's shared graph when set up by the runner, else for
        `example`'s input size, default [1, 3, 224, 224]), choose the drawn layers, check the crops."""
        if not layers:
            raise ValueError(f"{self.name}: choose at least one layer")
        device = next(model.parameters()).device
        try:
            if self._loaded is not None and self._loaded.module is model and example is None:
                self.graph = self._loaded.support_graph()
            else:
                example = example if example is not None else torch.zeros(1, 3, 224, 224)
                self.graph = SupportGraph(model, torch.zeros_like(example[:1], device=device))
            order = {n: i for i, n in enumerate(self.graph.nodes)}
            chosen = sorted(layers, key=lambda l: order[self.graph.node(l)])
            drawn = self.graph.geometry_layers(chosen)
            self.drawn = drawn + [layer for layer in chosen if layer not in drawn]
            self.chosen = chosen[-1]
            self.layers = list(layers)
            with torch.no_grad():
                self.supports = self.graph.propagate(torch.zeros((1, 1) + self.graph.input_shape[1:], device=device), self.drawn)
        except GraphError as err:
            raise ValueError(f"{self.name}: {err}") from None
        ended = [layer for layer, s in self.supports.items() if s is END]
        if ended:
            raise ValueError(f"{self.name}: layers {ended} come after the spatial path ended (global pool or "
                             "linear layer); choose a convolutional layer")
        self.check_crops()
        self._cache = {}

    def input_size(self):
        return self.graph.input_shape[1:]

    def check_crops(self) -> None:
        H, W = self.input_size()
        self.boxes: List[Box] = parse_boxes(self.options.crop, "crop") or [centre_box(H, W)]
        check_inside(self.boxes, H, W, f"{self.name}.crop (input pixels after preprocessing)")

    def labels(self) -> Dict[str, str]:
        return {layer: field_label(self.supports.get(layer)) for layer in self.drawn}

    def draw(self) -> Draw:
        """What the renderer needs: display mode, scale, tile labels and the crops on the input."""
        return Draw(self.options.display, self.scale, self.labels(), tuple(list(b) for b in self.boxes))

    def _attribute(self, p):
        if self.graph is None or self.layers != list(p.layers) or tuple(p.x.shape[1:]) != self.graph.input_shape:
            self.prepare(p.model, p.layers, p.x)  # standalone use, or another input size
        key = (p.x.device, tuple(p.x.shape[2:]))
        if key not in self._cache:
            self._cache = {key: {layer: m.detach() for layer, m in self.compute(p.x.device).items()}}
        N = p.x.shape[0]
        return {(layer, "map"): m.unsqueeze(0).expand(N, *m.shape) for layer, m in self._cache[key].items()}

    def masks(self, device) -> torch.Tensor:
        """[K, 1, H, W]: 1 inside crop k."""
        return box_masks(self.boxes, *self.input_size(), device=device)

    def compute(self, device) -> Dict[str, torch.Tensor]:
        """{layer: [K, h, w]} for every drawn layer, K = the number of crops."""
        raise NotImplementedError


@register("rf_forward")
class RFForward(SupportMaps):
    """Per drawn layer map [N, K, h, w] in [0, 1]: the fraction of each element's input support
    inside crop k (padding counts as outside)."""

    def compute(self, device):
        with torch.no_grad():
            supports = self.graph.propagate(self.masks(device), self.drawn)
        return {layer: spatial_map(s) for layer, s in supports.items()}
