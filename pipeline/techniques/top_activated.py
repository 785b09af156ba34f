"""The most activated channels of each input, beside their filter_vis images (cached on disk)."""
from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch

from pipeline.contracts import Family, Kind, Output
from pipeline.io.render import write_png
from pipeline.techniques.base import ACTS, Technique, register
from pipeline.techniques.filter_vis import FilterVis, check_size


def cache_root(cache_dir: Optional[str]) -> Path:
    """The folder of cached filter images (see TopActivated)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("PIPELINE_CACHE_DIR"):
        return Path(os.environ["PIPELINE_CACHE_DIR"]).expanduser() / "filter_vis"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pipeline" / "filter_vis"


@register("top_activated")
class TopActivated(Technique):
    """Per input and chosen layer: the `top` channels by mean activation, channels [N, top] and mean
    [N, top], and their filter_vis images [N, top, 3, S, S] uint8.

    Filter images live in `cache_dir/<key>/<channel>.png`, the key a hash of the model's weights,
    the layer, the filter_vis settings and the seed, so a second input or a second run reuses them; the
    channels missing from the cache are optimized together, max_batch rows at a time. A channel's
    random start is keyed by the run's seed, the layer and the channel (as in filter_vis), so its
    image does not depend on which batch first needed it. Images are written atomically, so jobs
    sharing a cache never read half a PNG. `cache_dir` null: `$PIPELINE_CACHE_DIR/filter_vis`, else
    `$XDG_CACHE_HOME/pipeline/filter_vis`, else `~/.cache/pipeline/filter_vis`.
    """

    family = Family.FEATVIS
    outputs = {"channels": Output(Kind.DATA, "[N, top]", "int64"), "mean": Output(Kind.DATA, "[N, top]"),
               "images": Output(Kind.TILES, "[N, top, 3, S, S]", "uint8", doc="the channels' filter_vis images")}
    needs = frozenset({ACTS})
    video = False
    layouts = True  # token and channels-last layers: channels of the maps, filter images through the same reading

    @dataclass
    class Options:
        top: int = 4
        cache_dir: Optional[str] = None  # null: $PIPELINE_CACHE_DIR/filter_vis or ~/.cache/pipeline/filter_vis
        size: int = 64  # filter_vis settings of the cached images
        steps: int = 64
        lr: float = 0.05
        param: str = "fourier"

        def __post_init__(self):
            if self.top < 1 or self.size < 8 or self.steps < 1:
                raise ValueError("top_activated: top >= 1, size >= 8 and steps >= 1")

    def check_model(self, model, layers):
        check_size(self.name, model, layers, self.options.size, self.layout)

    def setup(self, model):
        self.preprocess = model.preprocess

    def check_layers(self, shapes):
        super().check_layers(shapes)
        self.require_image_maps(shapes)

    def weights_digest(self, model: torch.nn.Module) -> str:
        """sha1 of the model's state dict, hashed once per model while no tensor of it is replaced or
        changed in place (the fingerprint: each tensor's storage and version counter), not per batch."""
        state = model.state_dict()
        fingerprint = tuple((name, t.data_ptr(), t._version) for name, t in state.items())
        digests = self.__dict__.setdefault("_digests", weakref.WeakKeyDictionary())
        if model in digests and digests[model][0] == fingerprint:
            return digests[model][1]
        weights = hashlib.sha1()
        for name, tensor in state.items():
            weights.update(name.encode())
            weights.update(tensor.detach().cpu().numpy().tobytes())
        digests[model] = (fingerprint, weights.hexdigest())
        return digests[model][1]

    def cache_folder(self, model: torch.nn.Module, layer: str, seed: int) -> Path:
        """The folder of a layer's cached filter images under these settings: `<channel>.png` each."""
        settings = {k: v for k, v in asdict(self.options).items() if k not in ("top", "cache_dir")}
        if self.layout != "auto":  # a forced reading may give other channels (auto's images stay valid)
            settings["layout"] = self.layout
        key = hashlib.sha1(json.dumps([self.weights_digest(model), layer, settings, seed], sort_keys=True).encode()).hexdigest()
        return cache_root(self.options.cache_dir) / key[:20] / layer

    _cache = cache_folder

    def _attribute(self, p):
        o = self.options
        settings = dict(size=o.size, steps=o.steps, lr=o.lr, param=o.param)
        maps = {}
        for layer, a in p.activations().items():
            mean = a.float().flatten(2).mean(2)  # [N, C]
            values, ids = mean.topk(min(o.top, mean.shape[1]), dim=1)  # [N, top]
            cache = self._cache(p.model, layer, p.seed)
            missing = sorted({c for c in ids.flatten().tolist() if not (cache / f"{c}.png").exists()})
            if missing:
                # seeded like the run's filter_vis: a channel's image depends on seed, layer, channel only
                generator = torch.Generator(device=p.x.device).manual_seed(p.seed)
                maker = FilterVis(channels=",".join(map(str, missing)), **settings)
                maker.layout = self.layout
                made = maker.generate(
                    p.model, [layer], device=p.x.device, generator=generator, max_batch=p.max_batch,
                    preprocess=getattr(self, "preprocess", None))
                for c, image in zip(made[layer, "index"].tolist(), made[layer, "images"].cpu().numpy()):
                    write_png(cache / f"{c}.png", image.transpose(1, 2, 0))  # atomic: a concurrent job never reads half
            images = np.stack([[cv2.cvtColor(cv2.imread(str(cache / f"{c}.png")), cv2.COLOR_BGR2RGB).transpose(2, 0, 1)
                                for c in row] for row in ids.tolist()])  # [N, top, 3, S, S]
            maps[layer, "channels"], maps[layer, "mean"] = ids, values
            maps[layer, "images"] = torch.from_numpy(images)
        return maps
