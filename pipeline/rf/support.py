"""Support maps and receptive-field geometry: the values that flow through a traced CNN graph.

A `Support` stands for one real tensor of the network. Its `map` says, per element, which fraction
of that element's input support lies in a region of the input (a crop); it has the real tensor's
rank but may be 1 along non-spatial axes (the same value for every channel). Its `fields` give,
per spatial axis, the theoretical receptive field of the element at index 0: size, jump (input
pixels between neighbouring elements) and the input coordinate of its centre (pixel centres are
integers). `END` stands for a tensor whose spatial path has ended (global pool, linear layer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F


class _Ended:
    def __repr__(self) -> str:
        return "END"


END = _Ended()


@dataclass(frozen=True)
class Field:
    """The theoretical receptive field along one axis of the element at index 0."""

    size: float  # input pixels it covers
    jump: float  # input pixels between neighbouring elements (the cumulative stride)
    start: float  # input coordinate of its centre; element i's centre is start + i * jump

    def window(self, k_eff: float, stride: float, pad_left: float) -> "Field":
        """After a sliding window of effective size k_eff (dilation included), stride and left padding."""
        return Field(self.size + (k_eff - 1) * self.jump, self.jump * stride,
                     self.start + ((k_eff - 1) / 2 - pad_left) * self.jump)

    def bounds(self) -> Tuple[float, float]:
        half = (self.size - 1) / 2
        return self.start - half, self.start + half


def union(fields: Sequence[Field]) -> Field:
    """The smallest field covering all of them (branches merged at an add or a concatenation)."""
    lo = min(f.bounds()[0] for f in fields)
    hi = max(f.bounds()[1] for f in fields)
    return Field(hi - lo + 1, max(f.jump for f in fields), (lo + hi) / 2)


@dataclass
class Support:
    map: torch.Tensor  # same rank as `shape`, broadcastable to it
    shape: Tuple[int, ...]  # the real tensor's shape (batch first)
    dims: Tuple[int, ...]  # positions of the spatial axes in `shape`, in the order of `fields`
    fields: Tuple[Field, ...]

    @property
    def spatial(self) -> Tuple[int, ...]:
        return tuple(self.shape[d] for d in self.dims)

    def channels_first(self) -> bool:
        """True when the spatial axes are the trailing axes after batch and channels: [N, C, *S]."""
        return len(self.shape) == 2 + len(self.dims) and self.dims == tuple(range(2, len(self.shape)))

    def full(self) -> torch.Tensor:
        """The map expanded to the real shape (a view)."""
        return self.map.expand(self.shape)

    def with_map(self, m: torch.Tensor, shape: Sequence[int] | None = None, **kw) -> "Support":
        return replace(self, map=m, shape=tuple(shape if shape is not None else self.shape), **kw)


def pad_pairs(in_size: int, out_size: int, k_eff: int, stride: int, declared: int | str,
              ceil_mode: bool = False) -> Tuple[int, int]:
    """(left, right) padding of a sliding window that turned in_size into out_size.

    The declared padding is tried first, then TensorFlow-style dynamic 'same' padding (timm's
    Conv2dSame / MaxPool2dSame), then extra right padding for ceil_mode pools. Raises ValueError
    when none gives the observed output size.
    """
    def out(left: int, right: int) -> int:
        return (in_size + left + right - k_eff) // stride + 1

    if declared == "same":
        total = k_eff - 1
        candidates = [(total // 2, total - total // 2)]
    elif declared == "valid":
        candidates = [(0, 0)]
    else:
        candidates = [(int(declared), int(declared))]
    total = max((math.ceil(in_size / stride) - 1) * stride + k_eff - in_size, 0)
    candidates.append((total // 2, total - total // 2))
    for left, right in candidates:
        if out(left, right) == out_size:
            return left, right
    left, right = candidates[0]
    extra = (out_size - 1) * stride + k_eff - (in_size + left + right)
    if ceil_mode and extra > 0 and out(left, right + extra) == out_size:
        return left, right + extra
    raise ValueError(f"a window of {k_eff} with stride {stride} and padding {declared!r} does not turn "
                     f"{in_size} into {out_size}")


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def box(s: Support, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
        padding: Sequence, out_spatial: Sequence[int], *, groups: int = 1, out_channels: int | None = None,
        mix_channels: bool = True, padding_mode: str = "zeros", ceil_mode: bool = False) -> Support:
    """A convolution or pooling layer replaced by an averaging box filter of the same geometry.

    Padded positions count as zeros (outside every crop) except for reflect / replicate /
    circular padding, which repeats the map like the layer repeats its input. mix_channels: each
    output channel averages the input channels of its group (a convolution); otherwise channel by
    channel (a pooling layer).
    """
    if not s.channels_first():
        raise ValueError(f"expects a channels-first tensor [N, C, *spatial], got shape {list(s.shape)}")
    d = len(s.dims)
    k_eff = [dl * (k - 1) + 1 for k, dl in zip(kernel, dilation)]
    pads = [pad_pairs(i, o, ke, st, p, ceil_mode) for i, o, ke, st, p in zip(s.spatial, out_spatial, k_eff, stride, padding)]
    fields = tuple(f.window(ke, st, pl) for f, ke, st, (pl, _) in zip(s.fields, k_eff, stride, pads))
    m = s.map.float()
    N, c = m.shape[0], m.shape[1]
    C_in = s.shape[1]
    C_out = out_channels if out_channels is not None else C_in
    if mix_channels:
        if c == 1 or groups == 1:
            m, g = (m if c == 1 else m.mean(1, keepdim=True)), 1
        else:  # per-channel maps into a grouped convolution: average within each group
            m, g = m.reshape(N, groups, C_in // groups, *m.shape[2:]).mean(2), groups
    else:
        g = c
    flat = [p for pair in reversed(pads) for p in pair]
    if any(flat):
        mode = "constant" if padding_mode == "zeros" else padding_mode
        m = F.pad(m, flat, mode=mode) if mode != "constant" else F.pad(m, flat)
    if all(k == 1 for k in kernel):  # 1 x 1: the map, subsampled by the stride
        m = m[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in stride)]
    elif all(dl == 1 for dl in dilation):  # a box filter per channel is an average pool (padding done above)
        m = _POOL[d](m, tuple(kernel), tuple(stride))
    else:
        weight = m.new_full((g, 1, *kernel), 1.0 / math.prod(kernel))
        m = _CONV[d](m, weight, stride=tuple(stride), dilation=tuple(dilation), groups=g)
    if tuple(m.shape[2:]) != tuple(out_spatial):
        raise ValueError(f"box filter gave {list(m.shape[2:])}, the layer gives {list(out_spatial)}")
    if mix_channels and g > 1:
        m = m.repeat_interleave(C_out // g, dim=1)
    shape = (s.shape[0], C_out, *out_spatial)
    return Support(m, shape, s.dims, fields)


def merge(supports: List[Support], shape: Sequence[int]) -> Support:
    """Branches meeting in an elementwise op: the mean of their maps, the union of their fields."""
    first = supports[0]
    if len(supports) == 1:
        return first.with_map(first.map, shape)
    for s in supports[1:]:
        if s.dims != first.dims or s.spatial != first.spatial:
            raise ValueError(f"branches with spatial shapes {list(first.spatial)} and {list(s.spatial)} meet")
    m = sum(s.map for s in supports) / len(supports)
    fields = tuple(union(fs) for fs in zip(*(s.fields for s in supports)))
    return Support(m, tuple(shape), first.dims, fields)
