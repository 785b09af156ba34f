"""model=torchvision: any torchvision classification, segmentation or detection model by name, with
its named weights (segmentation and detection outputs are read as scores: pipeline.scores)."""
from __future__ import annotations

import difflib
import inspect
from typing import List, Optional, Tuple

from torch import nn

from pipeline.errors import ConfigError
from pipeline.families.base import IMAGENET, Built, register_family
from pipeline.weights import torchvision_model

DETECTION_SIZE = 800  # torchvision detectors' own min_size


def preprocess_defaults(name: str) -> dict:
    """Crop, resize, mean and std of the model's default weights' transforms (no download)."""
    import torchvision.models as tvm

    if name in tvm.list_models(module=tvm.detection):  # it resizes and normalises itself: [0, 1] squares of its min_size
        return dict(input_size=DETECTION_SIZE, resize=DETECTION_SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    try:
        t = tvm.get_model_weights(name).DEFAULT.transforms()
        resize = list(t.resize_size)
        crop = list(getattr(t, "crop_size", resize))  # segmentation: resized, not cropped (a square of that side here)
    except (ValueError, KeyError, AttributeError, TypeError):
        return dict(IMAGENET)
    return dict(input_size=int(crop[0]), resize=int(min(resize)), mean=tuple(t.mean), std=tuple(t.std))


def torchvision_net(name: str, weights: Optional[str], num_classes: Optional[int] = None,
                    load: bool = True, size: Optional[int] = None) -> Tuple[nn.Module, Optional[List[str]]]:
    """The model and its class names; `load=False`: the named weights are checked and their class
    names kept, but the architecture is left at random initialization (nothing is read). A
    detection model is built with min_size = max_size = `size` (model.input_size, else
    DETECTION_SIZE), so it takes the pipeline's square inputs without resizing them again."""
    import torchvision.models as tvm

    if name not in tvm.list_models():
        close = difflib.get_close_matches(name, tvm.list_models(), n=5)
        raise ConfigError(f"unknown torchvision model {name!r}; closest: {', '.join(close) or 'none'}")
    kwargs = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if name in tvm.list_models(module=tvm.detection):
        kwargs.update(min_size=size or DETECTION_SIZE, max_size=size or DETECTION_SIZE)
    bare = dict(kwargs)
    if "weights_backbone" in inspect.signature(tvm.get_model_builder(name)).parameters:
        bare["weights_backbone"] = None  # segmentation / detection: random init reads no backbone weights either
    if weights is None:
        return tvm.get_model(name, weights=None, **bare), None
    try:
        w = tvm.get_model_weights(name)[weights] if weights != "DEFAULT" else tvm.get_model_weights(name).DEFAULT
    except KeyError:
        names = [m.name for m in tvm.get_model_weights(name)]
        raise ConfigError(f"unknown weights {weights!r} for {name}; known: DEFAULT, {', '.join(names)}") from None
    model = torchvision_model(name, w, kwargs) if load else tvm.get_model(name, weights=None, **bare)
    return model, list(w.meta.get("categories") or []) or None


@register_family("torchvision")
def build(cfg, load_weights: bool) -> Built:
    """model.name with model.weights (null: random initialization); preprocessing from the
    weights' transforms."""
    if not cfg.name:
        raise ConfigError("model=torchvision needs model.name (e.g. resnet18)")
    model, names = torchvision_net(cfg.name, cfg.weights, load=load_weights, size=cfg.input_size)
    desc = f"torchvision {cfg.name} weights={cfg.weights}"
    if not load_weights and cfg.weights is not None:
        desc += " (architecture only, weights not loaded)"
    return Built(model, desc, names, preprocess_defaults(cfg.name))
