"""A tiny random-init timm ViT for the attention techniques (its own module: importing timm is slow)."""
import torch
from timm.models.vision_transformer import VisionTransformer

from tests.tinymodels import Boom


class TinyViT(VisionTransformer):
    """timm's VisionTransformer: `img_size` input (16), 4x4 patches, 16 channels, 2 blocks of 2
    heads, `prefix` tokens = class token + `reg_tokens`; a Boom (tests.tinymodels) before its head
    makes the forward raise after every attention ran."""

    def __init__(self, num_classes: int = 10, img_size: int = 16, patch_size: int = 4, **kw):
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=16, depth=2, num_heads=2,
                         num_classes=num_classes, **kw)
        self.boom = Boom()

    def forward_head(self, x, pre_logits: bool = False):
        return super().forward_head(self.boom(x), pre_logits=pre_logits)


def tiny_vit(seed: int = 0, **kw) -> TinyViT:
    torch.manual_seed(seed)
    return TinyViT(**kw).eval()
