"""Channel relevance: which channels drive each class, from Grad-CAM's channel weights (Selvaraju
et al. 2017, https://arxiv.org/abs/1610.02391) averaged over a run per target class.

For an input, a target class k and a channel c of a layer with map A_c [h, w], the channel's
contribution is Grad-CAM's weight times its mean activation,

    alpha_kc * mean(A_c),   alpha_kc = mean over positions of d score_k / d A_c,

so the contributions of all channels add up to the spatial mean of the Grad-CAM map before its
ReLU. The run-level summary averages them per class over the (input, target) pairs of the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

import numpy as np
import torch

from pipeline.contracts import Draw, Family, Kind, Output, Paper
from pipeline.techniques.base import ACTS, LAYER_GRADS, Technique, register
from pipeline.techniques.channels import is_all, parse_channels


@register("channel_relevance")
class ChannelRelevance(Technique):
    """Per input, target and chosen channel of each chosen layer: Grad-CAM's channel weight times the
    channel's mean activation, contribution [N, K, C] (C: the `channels` chosen), with the targets'
    classes [N, K] and the model's class count [N] (so the summary is recomputed from rows alone).
    Activations and gradients come from the shared Pass: with gradcam on the same layers, one
    forward and one backward per target for both.

    Its run-level summary (sums and counts per class: merges across shards and resumes) per layer:
    mean [classes, C] (NaN for a class no input targeted), count [classes], the `top` channels per
    class by mean, top_channels [classes, t] (-1 for a class never targeted; ties: lower channel
    first) and top_values [classes, t], and the chosen channels [C]."""

    family = Family.CAM
    paper = Paper("Selvaraju et al. 2017", "https://arxiv.org/abs/1610.02391")
    outputs = {"contribution": Output(Kind.DATA, "[N, K, C]", doc="gradient weight x mean activation, per target"),
               "classes": Output(Kind.DATA, "[N, K]", "int64", doc="the targets' classes"),
               "num_classes": Output(Kind.DATA, "[N]", "int64", doc="the model's class count")}
    summary_outputs = {"mean": Output(Kind.DATA, "[classes, C]", doc="mean contribution per class"),
                       "count": Output(Kind.DATA, "[classes]", "int64", doc="(input, target) pairs per class"),
                       "top_channels": Output(Kind.DATA, "[classes, t]", "int64", doc="-1: class never targeted"),
                       "top_values": Output(Kind.DATA, "[classes, t]"),
                       "channels": Output(Kind.DATA, "[C]", "int64", doc="the chosen channels")}
    needs = frozenset({ACTS, LAYER_GRADS})
    layouts = True  # only the shared pass's maps and gradients: token and channels-last layers work
    video = False
    has_summary = True

    @dataclass
    class Options:
        channels: Any = "all"  # all | 0-63 | 0-3,7,9 | a list of ids
        top: int = 8  # channels per class in the summary's top_channels

        def __post_init__(self):
            if self.top < 1:
                raise ValueError(f"channel_relevance: top={self.top}; expected >= 1")
            if not is_all(self.channels):
                parse_channels(self.channels)  # a malformed list fails at start-up

    def check_layers(self, shapes):
        super().check_layers(shapes)
        for layer, shape in shapes.items():
            if len(shape) not in (2, 4):
                raise ValueError(f"{self.name}: layer {layer!r} outputs {list(shape)}; it needs an image feature "
                                 "map [N, C, h, w] or a vector [N, C] (no 3D video layers)")
            try:
                parse_channels(self.options.channels, shape[1], layer)
            except ValueError as err:
                raise ValueError(f"{self.name}: {err}") from None

    def _attribute(self, p):
        acts, grads = p.activations(), p.layer_grads()
        targets = p.targets.to(torch.int64)  # [N, K]
        N, num_classes = targets.shape[0], p.logits.shape[1]
        out = {}
        for layer in p.layers:
            a, g = acts[layer], grads[layer]  # [N, C, *S], [N, K, C, *S]
            chosen = torch.tensor(parse_channels(self.options.channels, a.shape[1], layer), device=a.device)
            alpha = g.reshape(*g.shape[:3], -1).mean(3)[:, :, chosen]  # [N, K, C]
            mean_act = a.reshape(*a.shape[:2], -1).mean(2)[:, chosen]  # [N, C]
            out[layer, "contribution"] = alpha * mean_act[:, None]
            out[layer, "classes"] = targets
            out[layer, "num_classes"] = torch.full((N,), num_classes, dtype=torch.int64, device=a.device)
        return out

    def draw(self) -> Draw:
        """No map to draw: the summary is a class x channel table (png/<technique>.png not drawn)."""
        return Draw(summary_map=False)

    # -- run-level summary ----------------------------------------------------------------------
    def partial(self, rows, ids):
        """Per layer the sum of the contributions per target class, sum [classes, C] float64, and
        the (input, target) pairs per class, count [classes] int64."""
        out = {}
        for layer in dict.fromkeys(layer for layer, _ in rows):
            contribution = np.asarray(rows[layer, "contribution"], dtype=np.float64)  # [R, K, C]
            classes = np.asarray(rows[layer, "classes"], dtype=np.int64).reshape(-1)  # [R * K]
            n = class_count(rows[layer, "num_classes"], layer)
            if classes.size and not (0 <= classes.min() and classes.max() < n):
                raise ValueError(f"{self.name}: {layer!r} has target classes outside 0..{n - 1}")
            sums = np.zeros((n, contribution.shape[-1]), dtype=np.float64)
            np.add.at(sums, classes, contribution.reshape(len(classes), -1))
            out[f"{layer}/sum"] = sums
            out[f"{layer}/count"] = np.bincount(classes, minlength=n).astype(np.int64)
        return out

    def finalize(self, stats):
        """Per layer mean [classes, C] float32, count [classes], top_channels / top_values [classes, t]
        and channels [C] (see the class docstring)."""
        out = {}
        for name in stats:
            layer, _, what = name.rpartition("/")
            if what == "sum":
                out.update(self.layer_summary(layer, np.asarray(stats[name]), np.asarray(stats[f"{layer}/count"])))
        return out

    def layer_summary(self, layer: str, sums: np.ndarray, counts: np.ndarray) -> Dict[Tuple[str, str], np.ndarray]:
        """One layer's summary arrays from its sums [classes, C] and counts [classes]."""
        spec, width = self.options.channels, sums.shape[1]
        channels = np.array(parse_channels(spec, width if is_all(spec) else None), dtype=np.int64)
        if len(channels) != width:
            raise ValueError(f"{self.name}: {layer!r} statistics have {width} channels, channels={spec!r} "
                             f"chooses {len(channels)}")
        seen = counts > 0
        mean = np.full(sums.shape, np.nan, dtype=np.float32)
        mean[seen] = (sums[seen] / counts[seen, None]).astype(np.float32)
        top_channels, top_values = top_per_row(mean, self.options.top)
        top_channels = np.where(seen[:, None], channels[top_channels], -1)
        top_values[~seen] = np.nan
        return {(layer, "mean"): mean, (layer, "count"): counts.astype(np.int64), (layer, "top_channels"): top_channels,
                (layer, "top_values"): top_values, (layer, "channels"): channels}


def top_per_row(values: np.ndarray, t: int) -> Tuple[np.ndarray, np.ndarray]:
    """The positions [rows, min(t, columns)] of each row's largest values (ties: the lower position
    first; NaN last) and those values."""
    order = np.argsort(-values, axis=1, kind="stable")[:, :min(t, values.shape[1])]
    return order.astype(np.int64), np.take_along_axis(values, order, axis=1)


def class_count(column, layer: str) -> int:
    """The one class count in a num_classes column [R]."""
    counts = np.unique(np.asarray(column, dtype=np.int64))
    if len(counts) != 1 or counts[0] < 1:
        raise ValueError(f"channel_relevance: {layer!r} rows disagree on the number of classes ({counts.tolist()})")
    return int(counts[0])
