"""Convolution kernels drawn as images (as in Krizhevsky et al. 2012, https://papers.nips.cc/paper/4824, Fig. 3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.techniques.base import Technique, register

NORMALIZE = ("layer", "tile")


@register("kernels")
class Kernels(Technique):
    """The weights [C_out, C_in, kh, kw] of each chosen Conv2d layer as tiles; needs no data.

    A layer with 3 input channels (per group) gives one RGB tile per filter; any other layer gives
    grey tiles of the first `in_channels` input channels of each filter, filter-major. Values:
      layer: round(127.5 * (1 + w / max|W|)), one symmetric scale for the whole layer's weights W,
             so 0 is mid-grey (128) and filters compare (a dead filter is flat grey);
      tile:  each tile min-max scaled, round(255 * (w - min) / (max - min)) (a flat tile: 128).
    Each tile is then repeated max(1, size // k) times along each axis (nearest), k = max(kh, kw).
    Returns per layer images [M, 3, kh * f, kw * f] uint8, index [M] the filter (output channel) of
    each tile and channel [M] its input channel (-1 for an RGB tile).
    """

    outputs = {"images": "gallery", "index": "data", "channel": "data"}
    uses_data = False

    @dataclass
    class Options:
        in_channels: int = 1  # non-RGB layers: grey tiles of this many input channels per filter
        normalize: str = "layer"  # layer (one symmetric scale per layer) | tile (min-max per tile)
        size: int = 48  # upsample tiles (nearest, integer factor) to about this many px; 0: no upsampling

        def __post_init__(self):
            if self.in_channels < 1 or self.normalize not in NORMALIZE or self.size < 0:
                raise ValueError(f"kernels: in_channels >= 1, normalize one of {NORMALIZE}, size >= 0")

    def check_model(self, model, layers):
        modules = dict(model.named_modules())
        bad = [layer for layer in layers if not isinstance(modules.get(layer), nn.Conv2d)]
        if bad:
            convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
            raise ValueError(f"{self.name}: {bad} are not Conv2d layers; choose Conv2d layers, e.g. "
                             f"layers=[{','.join(convs[:3])}]")

    def generate(self, model, layers, *, device, generator, max_batch, class_names=None, preprocess=None):
        self.check_model(model, layers)
        modules = dict(model.named_modules())
        out = {}
        for layer in layers:
            images, index, channel = kernel_tiles(modules[layer].weight.detach().float().cpu(), self.options)
            out[layer, "images"], out[layer, "index"], out[layer, "channel"] = images, index, channel
        return out


def kernel_tiles(w: torch.Tensor, o: Kernels.Options):
    """w [C_out, C_in, kh, kw] -> images [M, 3, kh*f, kw*f] uint8, index [M], channel [M]."""
    C_out, C_in, kh, kw = w.shape
    if C_in == 3:
        tiles = w  # [C_out, 3, kh, kw]
        index, channel = torch.arange(C_out), torch.full((C_out,), -1)
    else:
        n = min(o.in_channels, C_in)
        tiles = w[:, :n].reshape(C_out * n, 1, kh, kw).expand(-1, 3, -1, -1)  # grey: R = G = B
        index, channel = torch.arange(C_out).repeat_interleave(n), torch.arange(n).repeat(C_out)
    if o.normalize == "layer":
        scaled = 127.5 * (1 + tiles / w.abs().max().clamp_min(1e-12))
    else:
        lo = tiles.amin((1, 2, 3), keepdim=True)
        span = tiles.amax((1, 2, 3), keepdim=True) - lo
        scaled = torch.where(span > 0, 255 * (tiles - lo) / span.clamp_min(1e-12), torch.full_like(tiles, 128.0))
    images = scaled.round().clamp(0, 255).to(torch.uint8)
    f = max(1, o.size // max(kh, kw))
    images = images.repeat_interleave(f, 2).repeat_interleave(f, 3)
    return images, index, channel
