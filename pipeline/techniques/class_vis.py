"""Class model visualization (Simonyan et al. 2013, https://arxiv.org/abs/1312.6034): an image
that maximizes a class's pre-softmax logit, with L2 (and optionally L1 / TV) regularization."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch

from pipeline.featvis import base_seed, objectives, row_generators, visualize
from pipeline.techniques.base import Technique, chunks, register
from pipeline.techniques.filter_vis import make_transform
from pipeline.targets import TargetSpec

LOGITS = "logits"  # the layer name its outputs are stored under


def parse_classes(text, class_names=None) -> List[int]:
    """"281,Egyptian cat": indices or names (looked up in class_names; a miss lists close names)."""
    parts = [str(c) for c in text] if isinstance(text, (list, tuple)) else str(text).split(",")
    ids = []
    for part in (p.strip() for p in parts):
        spec = TargetSpec.parse(part, class_names)
        if spec.mode != "index":
            raise ValueError(f"classes: {part!r} is not a class index or name")
        ids.append(spec.value)
    if not ids:
        raise ValueError(f"classes={text!r} selects no class")
    return ids


@register("class_vis")
class ClassVis(Technique):
    """One image per chosen class, one class per batch row, max_batch rows at a time. Returns under
    layer "logits": images uint8 [M, 3, S, S], index [M] (classes) and objective [M, steps] (the
    class logit at each step)."""

    outputs = {"images": "gallery", "index": "data", "objective": "data"}
    uses_layers = False
    uses_data = False

    @dataclass
    class Options:
        classes: str = "0"  # indices and/or names: "281,Egyptian cat"
        init: str = "zero"  # zero (a grey image, as in the paper) | noise
        param: str = "pixel"  # pixel | fourier
        decorrelate: bool = True
        size: int = 0  # 0: the model's input size
        steps: int = 200
        lr: float = 0.05
        l2: float = 0.01
        l1: float = 0.0
        tv: float = 0.0
        jitter: int = 0
        scales: List[float] = field(default_factory=list)
        degrees: List[float] = field(default_factory=list)

    def __init__(self, **options):
        super().__init__(**options)
        if self.options.init not in ("zero", "noise"):
            raise ValueError(f"init={self.options.init!r}: expected zero or noise")
        if self.options.param not in ("pixel", "fourier"):
            raise ValueError(f"param={self.options.param!r}: expected pixel or fourier")

    def setup(self, model):
        ids = parse_classes(self.options.classes, model.class_names)
        bad = [c for c in ids if not 0 <= c < model.num_classes]
        if bad:
            raise ValueError(f"{self.name}: classes {bad} are outside the model's {model.num_classes} classes")

    def generate(self, model, layers, *, device, generator, max_batch, class_names=None, preprocess=None):
        o = self.options
        size = o.size or (preprocess.input_size if preprocess is not None else 224)
        ids = torch.tensor(parse_classes(o.classes, class_names), device=device)
        gens = row_generators(base_seed(generator), [("class", int(c)) for c in ids.tolist()], device)
        transform = make_transform(o.jitter, o.scales, o.degrees)
        images, history = [], []
        for s in chunks(len(ids), max_batch):
            main = objectives.class_logit(ids[s])
            objective = main + objectives.l2(o.l2) + objectives.l1(o.l1) + objectives.total_variation(o.tv)
            img, hist = visualize(model, objective, batch=len(ids[s]), generators=gens[s], device=device,
                                  size=size, steps=o.steps, lr=o.lr, param=o.param, decorrelate=o.decorrelate,
                                  init_sd=0.0 if o.init == "zero" else 0.5, transform=transform,
                                  preprocess=preprocess, track=main)
            images.append(img)
            history.append(hist)
        return {(LOGITS, "images"): torch.cat(images), (LOGITS, "index"): ids,
                (LOGITS, "objective"): torch.cat(history)}
