"""model=timm: any timm model by name, pretrained weights through timm's own cache."""
from __future__ import annotations

import difflib

from pipeline.errors import ConfigError
from pipeline.families.base import IMAGENET, Built, register_family
from pipeline.weights import timm_model


def preprocess_defaults(pretrained_cfg: dict) -> dict:
    """input_size, resize (from crop_pct), mean and std of a timm pretrained config."""
    size = int(pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return dict(input_size=size, resize=int(round(size / pretrained_cfg.get("crop_pct", 0.875))),
                mean=tuple(pretrained_cfg.get("mean", IMAGENET["mean"])),
                std=tuple(pretrained_cfg.get("std", IMAGENET["std"])))


@register_family("timm")
def build(cfg, load_weights: bool) -> Built:
    """model.name, pretrained when model.pretrained (and load_weights); preprocessing from the
    model's pretrained config."""
    import timm

    if not cfg.name or not timm.is_model(cfg.name):
        close = difflib.get_close_matches(str(cfg.name), timm.list_models(), n=5)
        raise ConfigError(f"unknown timm model {cfg.name!r}; closest: {', '.join(close) or 'none'}")
    model = timm_model(cfg.name, cfg.pretrained and load_weights)
    desc = f"timm {cfg.name} pretrained={cfg.pretrained}"
    if not load_weights and cfg.pretrained:
        desc += " (architecture only, weights not loaded)"
    return Built(model, desc, None, preprocess_defaults(model.pretrained_cfg))
