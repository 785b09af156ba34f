"""Mixed precision and page-locked batches: `precision=fp32|bf16|fp16`, `pin_memory`.

With bf16 or fp16 the no-grad forwards of perturbed copies run under `torch.autocast` on the
run's device (convolutions and matrix products in the lower precision; reductions, softmax and
normalisations in float32, PyTorch's autocast lists) and their logits are read as float32: the
rows of occlusion, Score-CAM, Ablation-CAM, IG's baseline, deletion / insertion, ROAD and the
confidence metrics, where a technique runs hundreds of forwards per input. Passes that take a
gradient (Grad-CAM and the saliency family) and the batch's own forward stay in float32: in bf16
their maps lose too much (measured: input gradients r ~0.7 against float32). The tolerance the
perturbation maps keep is measured in tests/test_precision.py and stated in README (*Precision*).
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def forward_autocast(precision: str, device: torch.device) -> ContextManager:
    """The context a no-grad perturbation forward runs in: torch.autocast in bf16 / fp16, nothing
    for fp32. Callers take `.float()` of the logits."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """A bf16 / fp16 result as float32 (what maps.h5 stores, and numpy can hold); others as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def pin(setting: Optional[bool], device: torch.device) -> bool:
    """Whether batches are page-locked: `pin_memory` null means when the device is CUDA; true
    elsewhere is refused (page-locked memory only speeds up copies to a GPU)."""
    from pipeline.config import ConfigError

    if setting is None:
        return device.type == "cuda"
    if setting and device.type != "cuda":
        raise ConfigError(f"pin_memory=true needs a CUDA device (device={device}); page-locked batches only "
                          "speed up copies to a GPU. Leave pin_memory=null (pins on CUDA only)")
    return bool(setting)
