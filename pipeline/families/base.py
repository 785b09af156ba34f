"""The model-family registry: `model.kind` names a builder registered here.

A family is one module in pipeline/families/ (imported, and so registered, automatically) with a
function decorated `@register_family("name")` that takes the `model` config and `load_weights`
and returns a `Built`; plus conf/model/<name>.yaml with `kind: name`. `pipeline.models.build_model`
does the rest (eval mode, device, preprocessing overrides, 3D detection, class names).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from torch import nn

from pipeline.errors import ConfigError

# ImageNet's preprocessing: the defaults of a family that has none of its own.
IMAGENET = dict(input_size=224, resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@dataclass
class Built:
    """What a family's builder returns: the network (any mode, any device), a one-line
    description, its class names if known, and its preprocessing defaults (input_size, resize,
    mean, std: what the config's null keys take)."""

    module: nn.Module
    description: str
    class_names: Optional[List[str]] = None
    preprocess: Dict[str, Any] = field(default_factory=lambda: dict(IMAGENET))


Builder = Callable[[Any, bool], Built]
FAMILIES: Dict[str, Builder] = {}
SCHEMAS: Dict[str, type] = {}  # name -> a pipeline.config.ModelConfig subclass with the family's own keys
IMPORTS: Dict[str, Callable[[Any], List[str]]] = {}  # name -> what building cfg imports as Python code


def register_family(name: str, schema: Optional[type] = None, imports: Optional[Callable[[Any], List[str]]] = None):
    """Function decorator: register `builder(cfg, load_weights) -> Built` as model.kind=`name`
    (a duplicate name raises ValueError). `schema`: a ModelConfig subclass typing the family's
    extra keys, stored as `schema/model/<name>` for its YAML to pull in. `imports(cfg)`: the
    Python code building `cfg` would import and call, one line each (`reproduce` refuses such
    a recorded config without --trust-code); a family that only names registry entries has none."""

    def wrap(builder: Builder) -> Builder:
        if name in FAMILIES:
            raise ValueError(f"model family {name!r} is already registered by {FAMILIES[name].__module__}")
        FAMILIES[name] = builder
        if schema is not None:
            SCHEMAS[name] = schema
        if imports is not None:
            IMPORTS[name] = imports
        return builder

    return wrap


def get_family(name: str) -> Builder:
    """The builder registered as `name`; an unknown name raises ConfigError listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"model.kind={name!r} is unknown; known: {', '.join(sorted(FAMILIES))}") from None


def code_imports(cfg) -> List[str]:
    """What building the `model` config `cfg` would import and call as Python code (its family's hook)."""
    hook = IMPORTS.get(cfg.kind)
    return list(hook(cfg)) if hook is not None else []


def imagenet_classes() -> List[str]:
    """The 1000 ImageNet class names, in index order (torchvision's list; nothing is downloaded)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)
