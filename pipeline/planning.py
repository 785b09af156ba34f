"""What a run is, checked before any work: the `Plan` (model, layers, target, techniques, source)
and the checks `runner.plan` runs to build it; `run_key`, what the rows of maps.h5 mean."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.config import ConfigError
from pipeline.data import Skip, Source
from pipeline.data.annotations import LABEL_REASON, Annotations, load_annotations
from pipeline.evaluation import SanityCheck
from pipeline.layouts import read_shapes
from pipeline.models import LoadedModel, default_layer, probe_shapes, resolve_layers
from pipeline.scores import inner
from pipeline.targets import TargetSpec
from pipeline.techniques import REGISTRY, Technique, get_technique

log = logging.getLogger("pipeline")


@dataclass
class Plan:
    """Everything checked and built before the first input is decoded."""

    cfg: DictConfig
    device: torch.device
    model: LoadedModel
    layers: List[str]
    target: TargetSpec
    techniques: Dict[str, Technique]
    source: Source
    sanity: Optional[SanityCheck] = None
    annotations: Optional[Annotations] = None  # data.annotations, matched to the source and the model's classes


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available; use device=auto or cpu")
    return torch.device(name)


def as_config(cfg) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)


def build_techniques(cfg) -> Dict[str, Technique]:
    """Every configured technique with its options; a bad name or option is a ConfigError."""
    techniques: Dict[str, Technique] = {}
    for name, options in cfg.technique.items():
        try:
            techniques[name] = get_technique(name)(**OmegaConf.to_container(options, resolve=True))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"technique {name}: {err}") from None
    return techniques


def check_clips(model: LoadedModel, source: Source, cfg) -> None:
    """A 3D (video) CNN needs clips, and clips need one."""
    clips = source.clip_len is not None
    if model.is_video and not clips:
        raise ConfigError(f"{model.description} is a 3D video CNN: it needs clips, e.g. data=video "
                          "data.path=FILE data.clip_len=16")
    if clips and not model.is_video:
        raise ConfigError(f"data.clip_len={cfg.data.clip_len} makes clips, but {model.description} "
                          "is not a 3D (video) CNN; drop data.clip_len to use single frames")


def plan_annotations(cfg, source: Source, model: LoadedModel, target: TargetSpec) -> Optional[Annotations]:
    """data.annotations loaded against the source's ids and the model's classes (None when unset).
    Under target=label, inputs without a label move to the source's skipped records (one warning)."""
    path = cfg.data.get("annotations")
    if path is None:
        return None
    if cfg.evaluate.pointing and source.clip_len is not None:
        raise ConfigError("evaluate.pointing scores 2-D maps against boxes; clips (data.clip_len) have none to point at")
    annotations = load_annotations(path, [it.id for it in source.items], model.class_names, model.num_classes)
    annotations.bind(source.items)
    if target.mode == "label":
        unlabelled = [it for it in source.items if annotations.label(it.id) is None]
        if len(unlabelled) == len(source.items):
            raise ConfigError(f"target=label: no input of this run has a label in data.annotations={path!r}")
        if unlabelled:
            log.warning("target=label: %d input(s) have no label in data.annotations and are skipped, e.g. %s",
                        len(unlabelled), ", ".join(it.id for it in unlabelled[:3]))
            source.items = [it for it in source.items if annotations.label(it.id) is not None]
            source.skipped = sorted([*source.skipped, *(Skip(it.id, it.source, it.frame, LABEL_REASON)
                                                        for it in unlabelled)], key=lambda s: s.id)
    return annotations


def check_torchscript(model: LoadedModel, techniques: Dict[str, Technique]) -> None:
    """A TorchScript model has no Python modules: only input-space techniques can use it."""
    if isinstance(inner(model.module), torch.jit.ScriptModule):
        refused = [name for name, t in techniques.items() if t.uses_layers or not t.torchscript]
        if refused:
            raise ConfigError(
                f"{refused} need the model's Python modules (layers to hook, ReLUs to reroute) and a "
                "TorchScript model has none; use an input-space technique (saliency, gradxinput, "
                "smoothgrad, integrated_gradients, occlusion) or save a state dict and set model.arch")


def choose_layers(cfg, model: LoadedModel, device: torch.device, techniques: Dict[str, Technique],
                  target: TargetSpec) -> List[str]:
    """The layers (patterns resolved; none given: the last conv block), checked by every technique."""
    layers: List[str] = []
    layered = [t for t in techniques.values() if t.uses_layers]
    try:
        target.check(model.num_classes)
        if layered:
            example = model.example(device)
            shapes = probe_shapes(model.module, example)
            size = tuple(example.shape[-2:])
            layers = resolve_layers(model.module, cfg.layers) if cfg.layers else [default_layer(model.module, shapes, size)]
            layouts, maps = read_shapes(model.module, {layer: shapes.get(layer) for layer in layers}, size, cfg.layout)
            other = {layer: str(layouts[layer]) for layer in layers if layouts[layer].kind != "nchw"}
            for technique in layered:  # every layer as maps [N, C, h, w] (ViT tokens, channels-last: pipeline.layouts)
                technique.layout, technique.layer_layouts = str(cfg.layout), dict(layouts)
                if other and not technique.layouts:
                    raise ConfigError(f"{technique.name} reads layers as [N, C, h, w] only, and "
                                      + ", ".join(f"{k} is {v}" for k, v in other.items())
                                      + "; these techniques read token and channels-last layers: "
                                      + ", ".join(sorted(n for n, cls in REGISTRY.items() if cls.layouts)))
                technique.check_layers(maps)
        for technique in techniques.values():
            technique.check_model(model.module, layers if technique.uses_layers else [])
    except ValueError as err:  # ConfigError included
        raise ConfigError(str(err)) from None
    return layers


def run_key(p: Plan) -> dict:
    """What the rows of maps.h5 mean; a resumed run must match it."""
    data = OmegaConf.to_container(p.cfg.data, resolve=True)
    data.pop("limit", None)
    return {
        "model": OmegaConf.to_container(p.cfg.model, resolve=True),
        "data": data,
        "technique": OmegaConf.to_container(p.cfg.technique, resolve=True),
        "layers": p.layers,
        "layout": str(p.cfg.layout),
        "precision": str(p.cfg.precision),
        "target": str(p.cfg.target),
        "score": OmegaConf.to_container(p.cfg.score, resolve=True),
        "evaluate": OmegaConf.to_container(p.cfg.evaluate, resolve=True),
        "store": OmegaConf.to_container(p.cfg.store, resolve=True),
    }


def decode_side(p: Plan) -> Optional[int]:
    """The shorter side large JPEGs may be decoded at (data.reduced_decode): the model's resize;
    None with a crop box, which is in full-size pixels."""
    return p.model.preprocess.resize if p.cfg.data.crop is None and p.cfg.data.reduced_decode else None
