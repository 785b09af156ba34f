"""Convolution kernels drawn as images (as in Krizhevsky et al. 2012, https://papers.nips.cc/paper/4824, Fig. 3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.contracts import Family, Kind, Output, Paper
from pipeline.progress import NO_PROGRESS, Progress
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

    A 1x1 convolution (other than on RGB) has one number per filter and input channel, so its
    tiles would be flat grey squares: it is drawn instead as its weight matrix [C_out, C_in]
    (row o: filter o, column i: input channel i), cut into square blocks of side s (`block_side`:
    the smaller of C_out, C_in split evenly into pieces of at most 64, so a weight is at least
    2.5 px on a 160 px tile), scaled as above, the part of a last block beyond the matrix white,
    each block repeated max(1, size // s) times; titled "<layer> · 1x1" over "out a-b · in c-d". A 1x1
    convolution on RGB keeps its colour tiles (a colour per filter), titled "<layer> · f <o> · 1x1 RGB".

    Returns per layer images [M, 3, kh * f, kw * f] uint8 (1x1 blocks: [M, 3, s * f, s * f]),
    index [M] the filter (output channel) of each tile (a block's first row), channel [M] its
    input channel (-1 for an RGB tile; a block's first column), and for 1x1 layers label [M] the
    tile titles. Progress: one unit per layer.
    """

    family = Family.FEATVIS
    paper = Paper("Krizhevsky et al. 2012", "https://papers.nips.cc/paper/4824")
    outputs = {"images": Output(Kind.GALLERY, "[M, 3, h, w]", "uint8"),
               "index": Output(Kind.DATA, "[M]", "int64", doc="each tile's filter (output channel)"),
               "channel": Output(Kind.DATA, "[M]", "int64", doc="each tile's input channel (-1: RGB)"),
               "label": Output(Kind.DATA, "[M]", "str", doc="the tile titles, for 1x1 layers")}
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

    def generate(self, model, layers, *, device, generator, max_batch, class_names=None, preprocess=None,
                 progress: Progress = NO_PROGRESS):
        self.check_model(model, layers)
        modules = dict(model.named_modules())
        progress.add(len(layers))
        out = {}
        for layer in layers:
            w = modules[layer].weight.detach().float().cpu()
            if w.shape[2:] == (1, 1) and w.shape[1] != 3:
                images, index, channel, titles = matrix_tiles(w, self.options, layer)
                out[layer, "label"] = titles
            else:
                images, index, channel = kernel_tiles(w, self.options)
                if w.shape[2:] == (1, 1):  # 1x1 on RGB: a colour per filter
                    out[layer, "label"] = [f"{layer} · f {int(o)} · 1x1 RGB" for o in index]
            out[layer, "images"], out[layer, "index"], out[layer, "channel"] = images, index, channel
            progress.step(1)
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
    return enlarge(to_grey_levels(tiles, o.normalize, w.abs().max()), o.size // max(kh, kw)), index, channel


def to_grey_levels(tiles: torch.Tensor, normalize: str, layer_max: torch.Tensor) -> torch.Tensor:
    """Weights -> 0..255: `layer` scales symmetrically by the layer's largest |weight| (0 is
    mid-grey), `tile` min-max scales each tile (a flat tile is mid-grey). tiles [M, ...]."""
    if normalize == "layer":
        return 127.5 * (1 + tiles / layer_max.clamp_min(1e-12))
    dims = tuple(range(1, tiles.dim()))
    lo = tiles.amin(dims, keepdim=True)
    span = tiles.amax(dims, keepdim=True) - lo
    return torch.where(span > 0, 255 * (tiles - lo) / span.clamp_min(1e-12), torch.full_like(tiles, 128.0))


def enlarge(levels: torch.Tensor, factor: int) -> torch.Tensor:
    """[M, 3, h, w] levels -> uint8 tiles enlarged by nearest repetition (factor >= 1)."""
    f = max(1, factor)
    return levels.round().clamp(0, 255).to(torch.uint8).repeat_interleave(f, 2).repeat_interleave(f, 3)


MATRIX_BLOCK = 64  # most rows / columns of a 1x1 layer's weight matrix in one tile (>= 2.5 px a weight at 160 px)


def block_side(rows: int, cols: int) -> int:
    """The side of the square blocks a [rows, cols] matrix is cut into: the smaller dimension, split
    evenly into pieces of at most MATRIX_BLOCK ([1280, 320] -> 64, [80, 240] -> 40, [16, 32] -> 16);
    at least min(16, the larger dimension), so a thin matrix ([32, 1]) is not cut into 1 x 1 tiles."""
    short = min(rows, cols)
    side = -(-short // -(-short // MATRIX_BLOCK))
    return max(side, min(16, max(rows, cols)))


def matrix_tiles(w: torch.Tensor, o: Kernels.Options, layer: str):
    """A 1x1 convolution's weights w [C_out, C_in, 1, 1] as the matrix [C_out, C_in] in square
    blocks (see Kernels) -> images [M, 3, s*f, s*f] uint8, index [M] (first rows), channel [M]
    (first columns), titles [M]."""
    W = w[:, :, 0, 0]
    C_out, C_in = W.shape
    side = block_side(C_out, C_in)
    images, index, channel, titles = [], [], [], []
    for r in range(0, C_out, side):
        for c in range(0, C_in, side):
            block = W[r:r + side, c:c + side]
            tile = torch.full((side, side), 255.0)  # beyond the matrix: white
            tile[:block.shape[0], :block.shape[1]] = to_grey_levels(block[None], o.normalize, W.abs().max())[0]
            images.append(tile)
            index.append(r)
            channel.append(c)
            titles.append(f"{layer} · 1x1\nout {r}-{r + block.shape[0] - 1} · in {c}-{c + block.shape[1] - 1}")
    images = enlarge(torch.stack(images)[:, None].repeat(1, 3, 1, 1), o.size // side)
    return images, torch.tensor(index), torch.tensor(channel), titles
