"""Filter visualization: activation maximization of chosen channels (Olah et al. 2017,
https://distill.pub/2017/feature-visualization/), Lucid-style or with a coarse-to-fine preset."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from pipeline.contracts import Family, Kind, Output, Paper
from pipeline.featvis import PRESETS, base_seed, objectives, row_generators, transforms, visualize, with_preset
from pipeline.featvis.optimize import normalize
from pipeline.hooks import capture, forward
from pipeline.progress import NO_PROGRESS, Progress
from pipeline.techniques.base import Technique, chunks, register


def parse_channels(text, count: Optional[int] = None) -> List[int]:
    """"all", "0-63", "0-3,7,9", an int or a list -> channel ids; out of range (with `count`) raises."""
    if isinstance(text, (list, tuple)):
        ids = [int(c) for c in text]
    elif str(text).strip() == "all":
        if count is None:
            raise ValueError("channels=all needs the layer's channel count")
        ids = list(range(count))
    else:
        ids = []
        for part in str(text).replace(" ", "").split(","):
            lo, sep, hi = part.partition("-")
            if not lo.isdigit() or (sep and not hi.isdigit()):
                raise ValueError(f"channels={text!r}: expected all, ids and ranges like 0-3,7,9")
            ids.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    if not ids:
        raise ValueError(f"channels={text!r} selects no channel")
    if count is not None and not all(0 <= c < count for c in ids):
        raise ValueError(f"channels={text!r}: the layer has {count} channels (0-{count - 1})")
    return ids


def make_transform(jitter: int, scales, degrees):
    return transforms.compose(transforms.jitter(jitter), transforms.random_scale(list(scales)),
                              transforms.random_rotate(list(degrees)))


def layer_channels(model, layers, size: int, device, preprocess, layout: str = "nchw") -> dict:
    """{layer: channel count} from one forward of a grey image (the layers read as maps by `layout`)."""
    with torch.no_grad(), capture(model, layers, stop=True, layout=layout) as acts:
        forward(model, normalize(torch.full((1, 3, size, size), 0.5, device=device), preprocess))
    return {layer: acts[layer].shape[1] for layer in layers}


def check_size(name: str, model, layers, size: int, layout: str) -> None:
    """Refuse before work a model that cannot take size x size images up to `layers` (a ViT built
    for one input size), naming the size it was probed at."""
    try:
        device = next(iter(model.parameters())).device
    except StopIteration:
        device = torch.device("cpu")
    try:
        layer_channels(model, layers, size, device, None, layout)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise ValueError(f"{name}: the model cannot take {size} x {size} images up to {', '.join(layers)} "
                         f"({type(err).__name__}: {err}); set its `size` to an input size the model takes "
                         "(a ViT: the size it was built for, e.g. 224)") from None


@register("filter_vis")
class FilterVis(Technique):
    """Images that maximize each chosen channel of each chosen layer, one channel per batch row,
    max_batch rows at a time. Returns per layer images uint8 [M, 3, S, S], index [M] (channel ids),
    objective [M, steps * (upscalings + 1)] (the channel/neuron activation at each step) and label
    [M] the tile titles ("blocks.4 · ch 5"; the gallery adds the final objective).

    Progress: channels x steps x (upscalings + 1) units over all layers, announced before the
    first step and reported after every optimization step of each chunk of rows."""

    family = Family.FEATVIS
    paper = Paper("Olah et al. 2017", "https://distill.pub/2017/feature-visualization/")
    outputs = {"images": Output(Kind.GALLERY, "[M, 3, S, S]", "uint8"), "index": Output(Kind.DATA, "[M]", "int64", doc="channel ids"),
               "objective": Output(Kind.DATA, "[M, steps]", doc="the activation at each step"),
               "label": Output(Kind.DATA, "[M]", "str", doc="the tile titles")}
    uses_data = False
    layouts = True  # ViT tokens and channels-last layers: the objective reads them as maps (pipeline.layouts)

    @dataclass
    class Options:
        channels: str = "0-7"  # all | 0-63 | 0-3,7,9
        objective: str = "channel"  # channel (mean over positions) | neuron (centre position)
        param: str = "fourier"  # fourier (decorrelated 1/f spectrum) | pixel
        decorrelate: bool = True  # fourier: ImageNet colour decorrelation
        init_sd: float = 0.01  # std of the random initial parameters (0: a grey image)
        preset: Optional[str] = None  # resnet34: 56 px, 20 steps x 13 scales (x1.2), lr 0.1, blur 5
        size: int = 128
        steps: int = 256
        lr: float = 0.05
        upscalings: int = 0
        upscale_factor: float = 1.2
        blur: int = 0  # box-blur kernel after each upscaling
        jitter: int = 8  # px
        scales: List[float] = field(default_factory=lambda: [1.0, 0.975, 1.025, 0.95, 1.05])
        degrees: List[float] = field(default_factory=lambda: [-5.0, 0.0, 5.0])
        l1: float = 0.0
        l2: float = 0.0
        tv: float = 0.0

    def __init__(self, **options):
        super().__init__(**options)
        self.options = o = with_preset(self.options, PRESETS)
        if o.objective not in ("channel", "neuron"):
            raise ValueError(f"objective={o.objective!r}: expected channel or neuron")
        if o.param not in ("pixel", "fourier"):
            raise ValueError(f"param={o.param!r}: expected pixel or fourier")
        if str(o.channels).strip() != "all":
            parse_channels(o.channels)  # a malformed list fails at start-up

    def check_layers(self, shapes):
        super().check_layers(shapes)
        self.require_image_maps(shapes)
        for shape in shapes.values():
            parse_channels(self.options.channels, shape[1])

    def check_model(self, model, layers):
        check_size(self.name, model, layers, self.options.size, self.layout)

    def generate(self, model, layers, *, device, generator, max_batch, class_names=None, preprocess=None,
                 progress: Progress = NO_PROGRESS):
        o = self.options
        counts = layer_channels(model, layers, o.size, device, preprocess, self.layout)
        transform = make_transform(o.jitter, o.scales, o.degrees)
        pick = objectives.channel if o.objective == "channel" else objectives.neuron
        out = {}
        seed = base_seed(generator)  # one for all layers: a channel's image depends on (layer, channel) only
        channels = {layer: parse_channels(o.channels, counts[layer]) for layer in layers}
        progress.add(sum(map(len, channels.values())) * o.steps * (o.upscalings + 1))
        for layer in layers:
            ids = torch.tensor(channels[layer], device=device)
            gens = row_generators(seed, [(layer, int(c)) for c in ids.tolist()], device)
            images, history = [], []
            for s in chunks(len(ids), max_batch):
                main = pick(layer, ids[s])
                objective = main + objectives.l1(o.l1) + objectives.l2(o.l2) + objectives.total_variation(o.tv)
                img, hist = visualize(model, objective, batch=len(ids[s]), generators=gens[s], device=device,
                                      size=o.size, steps=o.steps, lr=o.lr, param=o.param,
                                      decorrelate=o.decorrelate, init_sd=o.init_sd, transform=transform, preprocess=preprocess,
                                      upscalings=o.upscalings, upscale_factor=o.upscale_factor,
                                      blur=o.blur, track=main, progress=progress, layout=self.layout)
                images.append(img)
                history.append(hist)
            out[layer, "images"] = torch.cat(images)  # [M, 3, S, S] uint8
            out[layer, "index"] = ids  # [M]
            out[layer, "objective"] = torch.cat(history)  # [M, steps]
            out[layer, "label"] = [f"{layer} · ch {c}" for c in channels[layer]]  # [M] tile titles
        return out
