"""How a layer lays out its feature map, found from the model, so that no user writes a reshape.

Techniques see every layer as maps `[N, C, h, w]`. A layer may instead output

* `nhwc`: channels last, `[N, h, w, C]` (timm Swin stages, ConvNeXt's MLP inside a block);
* `tokens`: `[N, prefix + h*w, C]`, a class token, distillation token or registers first, then the
  patch grid row by row (timm and torchvision ViT / DeiT blocks).

`detect` reads the layout from the probed output shape and the input size (and, for tokens, the
model's patch grid when it has one); `layout=nchw|nhwc|tokens` overrides it. `Layout.to_maps`
turns an output into maps, `Layout.from_maps` puts (possibly changed) maps back into the output,
prefix tokens unchanged, so hooks can hand the model an output whose grid is the recorded maps
(gradients with respect to the maps then flow, pipeline.hooks.capture).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

LAYOUTS = ("auto", "nchw", "nhwc", "tokens")
MAX_PREFIX = 16  # tokens before the grid tried when the model does not say (class, distillation, registers)


@dataclass(frozen=True)
class Layout:
    kind: str = "nchw"  # nchw | nhwc | tokens
    prefix: int = 0  # tokens: how many come before the grid
    grid: Optional[Tuple[int, int]] = None  # tokens: (h, w) of the patch grid

    def __str__(self) -> str:
        if self.kind == "tokens":
            return f"tokens {self.prefix}+{self.grid[0]}x{self.grid[1]}"
        return self.kind

    def map_shape(self, shape: Tuple[int, ...]) -> Tuple[int, ...]:
        """The output shape [N, ...] as maps [N, C, h, w]."""
        if self.kind == "nhwc":
            return (shape[0], shape[3], shape[1], shape[2])
        if self.kind == "tokens":
            return (shape[0], shape[2], *self.grid)
        return tuple(shape)

    def to_maps(self, out: torch.Tensor) -> torch.Tensor:
        """The layer's output -> maps [N, C, h, w] (a view where the layout allows)."""
        if self.kind == "nhwc":
            return out.permute(0, 3, 1, 2)
        if self.kind == "tokens":
            n, _, c = out.shape
            return out[:, self.prefix:].transpose(1, 2).reshape(n, c, *self.grid)
        return out

    def from_maps(self, maps: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """maps [N, C, h, w] back into the layer's layout, a new tensor (never a view of `maps`,
        so in-place ops downstream cannot change them); for tokens the prefix tokens are taken
        from `out`."""
        if self.kind == "nhwc":
            return maps.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format)
        if self.kind == "tokens":
            grid = maps.flatten(2).transpose(1, 2)  # [N, h*w, C]
            return torch.cat([out[:, :self.prefix], grid], 1)
        return maps.clone()


NCHW = Layout()


def model_grid(model: nn.Module) -> Tuple[Optional[Tuple[int, int]], Optional[int]]:
    """(patch grid (h, w), prefix tokens) a ViT-family model states, else (None, None): timm's
    `patch_embed.grid_size` and `num_prefix_tokens`; torchvision's `image_size // patch_size` and
    its one class token."""
    embed = getattr(model, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    if grid is not None and getattr(model, "num_prefix_tokens", None) is not None:
        return (int(grid[0]), int(grid[1])), int(model.num_prefix_tokens)
    if hasattr(model, "class_token") and hasattr(model, "patch_size") and hasattr(model, "image_size"):
        side = int(model.image_size) // int(model.patch_size)
        return (side, side), 1
    return None, None


def _follows(h: int, w: int, size: Tuple[int, int]) -> bool:
    """Whether an h x w grid has the input's aspect ratio and is no larger than it."""
    H, W = size
    return 1 <= h <= H and 1 <= w <= W and h * W == w * H


def _token_layout(tokens: int, size: Tuple[int, int], grid, prefix) -> Optional[Layout]:
    if grid is not None and prefix is not None:
        for p in (prefix, 0):  # a layer before the class token is prepended (patch_embed) has none
            if tokens - p == grid[0] * grid[1]:
                return Layout("tokens", p, tuple(grid))
    H, W = size
    for p in range(0, MAX_PREFIX + 1):
        n = tokens - p
        if n < 1:
            break
        # the grid with the input's aspect ratio: h = sqrt(n * H / W)
        h = round((n * H / W) ** 0.5)
        for hh in (h - 1, h, h + 1):
            if hh >= 1 and n % hh == 0 and _follows(hh, n // hh, size):
                return Layout("tokens", p, (hh, n // hh))
    return None


def detect(shape: Optional[Sequence[int]], size: Tuple[int, int], model: Optional[nn.Module] = None,
           override: str = "auto") -> Layout:
    """The layout of a layer whose output for one input of spatial `size` (H, W) has `shape`
    ([1, ...]; None: not a tensor). `auto`: channels-last when the shape says so (see _nhwc),
    tokens when the model states its patch grid (model_grid), else nchw, which leaves the shape
    as it is (vectors and video maps included). `override` forces a kind (`tokens` then finds the
    grid from the token count and the input's aspect ratio if the model does not state one);
    ValueError when the shape cannot have it."""
    if override not in LAYOUTS:
        raise ValueError(f"layout={override!r}; expected one of {', '.join(LAYOUTS)}")
    if shape is None or override == "nchw":
        return NCHW
    shape = tuple(shape)
    if len(shape) == 4 and (override == "nhwc" or (override == "auto" and _nhwc(shape, size))):
        return Layout("nhwc")
    if len(shape) == 3 and override in ("auto", "tokens"):
        grid, prefix = model_grid(model) if model is not None else (None, None)
        if grid is not None or override == "tokens":
            found = _token_layout(shape[1], size, grid, prefix)
            if found is not None:
                return found
    if override == "auto":
        return NCHW
    raise ValueError(f"an output {list(shape)} cannot be read as layout={override} for a "
                     f"{size[0]}x{size[1]} input")


def _nhwc(shape: Tuple[int, ...], size: Tuple[int, int]) -> bool:
    """[1, a, b, c] is channels-last when (a, b), and not (b, c), follow the input's aspect ratio."""
    return len(shape) == 4 and _follows(shape[1], shape[2], size) and not _follows(shape[2], shape[3], size)


def read_shapes(model: nn.Module, shapes, size: Tuple[int, int], override: str = "auto"):
    """({layer: Layout}, {layer: shape as maps}) for probed `shapes` ({layer: [1, ...] or None}),
    every layer read with `override`."""
    layouts = {name: detect(shape, size, model, override) for name, shape in shapes.items()}
    maps = {name: (layouts[name].map_shape(shape) if shape is not None else None) for name, shape in shapes.items()}
    return layouts, maps


def default_token_layer(model: nn.Module, shapes, layouts) -> Optional[str]:
    """For a ViT-family model: the tokens entering its last attention (timm `blocks[-1].norm1`,
    torchvision `encoder.layers[-1].ln_1`), where every patch token still has its own place; the
    final norm after it only feeds the class token to the head, so its patch tokens get no
    gradient. None when no layer outputs tokens or the model has no attention module. `shapes`
    in execution order (hooks fire as modules finish)."""
    names = list(shapes)
    attention = [n for n, m in model.named_modules() if n and "attention" in type(m).__name__.lower()]
    tokens = [n for n in names if layouts.get(n) is not None and layouts[n].kind == "tokens"]
    if not attention or not tokens:
        return None
    last = attention[-1]
    starts = [i for i, n in enumerate(names) if n == last or n.startswith(last + ".")]
    if not starts:
        return None
    before = [n for n in tokens if names.index(n) < starts[0]]
    return before[-1] if before else None
