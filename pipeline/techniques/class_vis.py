"""Class model visualization (Simonyan et al. 2013, https://arxiv.org/abs/1312.6034): an image
that maximizes a class's pre-softmax logit, with L2 (and optionally L1 / TV) regularization.

The defaults follow filter_vis's recipe (Olah et al. 2017): Lucid's decorrelated Fourier
parameterization with jitter / scale / rotation robustness at 128 px, which gives recognisable
images. The paper's recipe (pixels, no transforms, the model's input size, 200 steps) makes
high-frequency adversarial patterns on modern CNNs; it is `preset=simonyan2013`, or set the options
param=pixel size=0 steps=200 jitter=0 scales=[] degrees=[]."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from pipeline.contracts import Family, Kind, Output, Paper
from pipeline.featvis import base_seed, objectives, row_generators, visualize, with_preset
from pipeline.progress import NO_PROGRESS, Progress
from pipeline.techniques.base import Technique, chunks, register
from pipeline.techniques.filter_vis import make_transform
from pipeline.targets import TargetSpec

# Named recipes: option overrides. simonyan2013: the paper's (and this technique's former default)
# recipe: gradient ascent on the pixels of a grey image at the model's input size, no transforms.
PRESETS: Dict[str, Dict[str, object]] = {
    "simonyan2013": dict(param="pixel", size=0, steps=200, jitter=0, scales=[], degrees=[]),
}

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


def class_label(c: int, class_names=None) -> str:
    """A class's tile title: "Egyptian cat (285)" with class names, else "class 285"."""
    if class_names and 0 <= c < len(class_names):
        return f"{class_names[c]} ({c})"
    return f"class {c}"


@register("class_vis")
class ClassVis(Technique):
    """One image per chosen class, one class per batch row, max_batch rows at a time. Returns under
    layer "logits": images uint8 [M, 3, S, S], index [M] (classes), objective [M, steps] (the
    class logit at each step) and label [M] the tile titles ("Egyptian cat (285)", or "class 285"
    for a model without class names; the gallery adds the final objective).

    Progress: classes x steps units, announced before the first step and reported after every
    optimization step of each chunk of rows."""

    family = Family.FEATVIS
    paper = Paper("Simonyan et al. 2013", "https://arxiv.org/abs/1312.6034")
    outputs = {"images": Output(Kind.GALLERY, "[M, 3, S, S]", "uint8"), "index": Output(Kind.DATA, "[M]", "int64", doc="classes"),
               "objective": Output(Kind.DATA, "[M, steps]", doc="the class logit at each step"),
               "label": Output(Kind.DATA, "[M]", "str", doc="the tile titles")}
    uses_layers = False
    uses_data = False

    @dataclass
    class Options:
        classes: str = "0"  # indices and/or names: "281,Egyptian cat"
        preset: Optional[str] = None  # simonyan2013: the paper's pixel recipe (see PRESETS)
        init: str = "zero"  # zero (a grey image, as in the paper) | noise
        param: str = "fourier"  # fourier (decorrelated 1/f spectrum) | pixel (the paper's)
        decorrelate: bool = True  # fourier: ImageNet colour decorrelation
        size: int = 128  # px; 0: the model's input size
        steps: int = 256
        lr: float = 0.05
        l2: float = 0.01
        l1: float = 0.0
        tv: float = 0.0
        jitter: int = 8  # px; robustness transforms as filter_vis (jitter=0 scales=[] degrees=[]: none)
        scales: List[float] = field(default_factory=lambda: [1.0, 0.975, 1.025, 0.95, 1.05])
        degrees: List[float] = field(default_factory=lambda: [-5.0, 0.0, 5.0])

    def __init__(self, **options):
        super().__init__(**options)
        self.options = o = with_preset(self.options, PRESETS)
        if o.init not in ("zero", "noise"):
            raise ValueError(f"init={o.init!r}: expected zero or noise")
        if o.param not in ("pixel", "fourier"):
            raise ValueError(f"param={o.param!r}: expected pixel or fourier")

    def setup(self, model):
        ids = parse_classes(self.options.classes, model.class_names)
        bad = [c for c in ids if not 0 <= c < model.num_classes]
        if bad:
            raise ValueError(f"{self.name}: classes {bad} are outside the model's {model.num_classes} classes")

    def generate(self, model, layers, *, device, generator, max_batch, class_names=None, preprocess=None,
                 progress: Progress = NO_PROGRESS):
        o = self.options
        size = o.size or (preprocess.input_size if preprocess is not None else 224)
        ids = torch.tensor(parse_classes(o.classes, class_names), device=device)
        gens = row_generators(base_seed(generator), [("class", int(c)) for c in ids.tolist()], device)
        transform = make_transform(o.jitter, o.scales, o.degrees)
        progress.add(len(ids) * o.steps)
        images, history = [], []
        for s in chunks(len(ids), max_batch):
            main = objectives.class_logit(ids[s])
            objective = main + objectives.l2(o.l2) + objectives.l1(o.l1) + objectives.total_variation(o.tv)
            img, hist = visualize(model, objective, batch=len(ids[s]), generators=gens[s], device=device,
                                  size=size, steps=o.steps, lr=o.lr, param=o.param, decorrelate=o.decorrelate,
                                  init_sd=0.0 if o.init == "zero" else 0.5, transform=transform,
                                  preprocess=preprocess, track=main, progress=progress)
            images.append(img)
            history.append(hist)
        return {(LOGITS, "images"): torch.cat(images), (LOGITS, "index"): ids,
                (LOGITS, "objective"): torch.cat(history),
                (LOGITS, "label"): [class_label(int(c), class_names) for c in ids.tolist()]}
