"""Image parameterizations (Lucid / Lucent): `(params, image_fn)` where `params` is a list of leaf
tensors to optimize and `image_fn()` returns the image [B, 3, H, W] in [0, 1] (through a sigmoid).

`generator` is one torch.Generator, or a sequence of them, one per row: row b is then drawn from
generator[b] alone, so a row's initial image does not depend on the batch it is in.
`from_image` goes the other way (used by the coarse-to-fine schedule after each upscaling).
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple, Union

import torch

Gen = Union[torch.Generator, Sequence[torch.Generator]]
Param = Tuple[List[torch.Tensor], Callable[[], torch.Tensor]]

# Square root of the ImageNet colour correlation matrix (Lucid's color_correlation_svd_sqrt),
# columns normalized to max norm 1: maps decorrelated channels to RGB.
COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR = COLOR_SQRT / COLOR_SQRT.norm(dim=0).max()
MAGIC = 4.0  # Lucid's scale of the inverse FFT output


def _randn(shape: Tuple[int, ...], generator: Gen, device) -> torch.Tensor:
    """[B, *shape[1:]] standard normal, row b from generator[b] when a sequence is given."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device)
    assert len(generator) == shape[0], "one generator per row"
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device) for g in generator])


def decorrelate(t: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] decorrelated colour space -> RGB-correlated space (same shape)."""
    return torch.einsum("bchw,dc->bdhw", t, COLOR.to(t))


def correlate_inverse(t: torch.Tensor) -> torch.Tensor:
    """Inverse of `decorrelate`."""
    return torch.einsum("bchw,dc->bdhw", t, torch.linalg.inv(COLOR).to(t))


def _logit(image: torch.Tensor) -> torch.Tensor:
    return torch.logit(image.clamp(1e-3, 1 - 1e-3))


def pixel(batch: int, size: int, generator: Gen, device, sd: float = 0.01) -> Param:
    """Pixels in logit space: image = sigmoid(params), params [B, 3, size, size] ~ N(0, sd)."""
    p = (_randn((batch, 3, size, size), generator, device) * sd).requires_grad_(True)
    return [p], lambda: torch.sigmoid(p)


def pixel_from_image(image: torch.Tensor) -> Param:
    p = _logit(image.detach()).requires_grad_(True)
    return [p], lambda: torch.sigmoid(p)


def _spectrum_scale(size: int, decay_power: float, device) -> torch.Tensor:
    """1/f scaling [1, 1, size, size // 2 + 1, 1] of the rfft spectrum (Lucid's fft_image)."""
    fy = torch.fft.fftfreq(size, device=device)[:, None]
    fx = torch.fft.rfftfreq(size, device=device)[None, :]
    freqs = (fx * fx + fy * fy).sqrt()
    return (1.0 / freqs.clamp_min(1.0 / size) ** decay_power)[None, None, ..., None]


def fourier(batch: int, size: int, generator: Gen, device, decorrelate: bool = True,
            sd: float = 0.01, decay_power: float = 1.0) -> Param:
    """Lucid's FFT parameterization: a spectrum [B, 3, size, size//2+1, 2] ~ N(0, sd), scaled by 1/f,
    inverse FFT (ortho) / 4, optionally colour-decorrelated, then a sigmoid -> [B, 3, size, size]."""
    spectrum = (_randn((batch, 3, size, size // 2 + 1, 2), generator, device) * sd).requires_grad_(True)
    return _fourier_fn(spectrum, size, decorrelate, decay_power)


def _fourier_fn(spectrum: torch.Tensor, size: int, decor: bool, decay_power: float) -> Param:
    scale = _spectrum_scale(size, decay_power, spectrum.device)

    def image_fn() -> torch.Tensor:
        complex_ = torch.view_as_complex((scale * spectrum).contiguous())
        image = torch.fft.irfftn(complex_, s=(size, size), norm="ortho") / MAGIC  # [B, 3, H, W]
        return torch.sigmoid(decorrelate(image) if decor else image)

    return [spectrum], image_fn


def fourier_from_image(image: torch.Tensor, decorrelate: bool = True, decay_power: float = 1.0) -> Param:
    """The spectrum whose image_fn() gives back `image` [B, 3, S, S] (square)."""
    size = image.shape[-1]
    t = _logit(image.detach())
    t = correlate_inverse(t) if decorrelate else t
    spectrum = torch.fft.rfftn(t * MAGIC, s=(size, size), norm="ortho")
    spectrum = torch.view_as_real(spectrum) / _spectrum_scale(size, decay_power, image.device)
    return _fourier_fn(spectrum.contiguous().requires_grad_(True), size, decorrelate, decay_power)


def make(kind: str, batch: int, size: int, generator: Gen, device, decorrelate: bool = True,
         sd: float = 0.01) -> Param:
    """`pixel` or `fourier` by name; sd=0 starts from a grey image."""
    if kind == "pixel":
        return pixel(batch, size, generator, device, sd)
    if kind == "fourier":
        return fourier(batch, size, generator, device, decorrelate, sd)
    raise ValueError(f"unknown parameterization {kind!r}; expected pixel or fourier")


def from_image(kind: str, image: torch.Tensor, decorrelate: bool = True) -> Param:
    return pixel_from_image(image) if kind == "pixel" else fourier_from_image(image, decorrelate)
