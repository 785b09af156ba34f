"""Occlusion (Zeiler & Fergus 2013, https://arxiv.org/abs/1311.2901)."""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

from pipeline.contracts import Family, Kind, Output, Paper
from pipeline.progress import Attempt
from pipeline.techniques.base import INPUT, Technique, register
from pipeline.techniques.incremental import Incremental, Unsupported

log = logging.getLogger("pipeline")


@register("occlusion")
class Occlusion(Technique):
    """Drop of the target logit, f(x) - f(x with a window set to `fill`), for a sliding window.

    Every occluded copy of every input is one row (all K targets read off its logits), built
    max_batch rows at a time (memory bounded by max_batch). With `incremental` (images, fp32,
    a model torch.fx can trace) each copy only recomputes what its window changes
    (pipeline.techniques.incremental, Krypton: https://arxiv.org/abs/1807.01624); the same maps
    as full inference, which is the fallback (logged). The drops are spread back to pixels, each pixel getting the mean
    drop of the windows covering it: drop [N, K, H, W] (or [N, K, T, H, W] for clips), positive
    where hiding the region lowers the score.
    """

    family = Family.PERTURBATION
    paper = Paper("Zeiler & Fergus 2013", "https://arxiv.org/abs/1311.2901")
    outputs = {"drop": Output(Kind.HEATMAP, "[N, K, (T,) H, W]")}
    uses_layers = False

    @dataclass
    class Options:
        window: int = 32  # square window side in pixels (clipped to the input size)
        stride: int = 16  # window step in pixels; a last window is added flush with each edge
        fill: float = 0.0  # value in model space (after normalisation): 0 is the dataset-mean colour
        frames: int = 0  # clips: window length and step in frames; 0: each window spans all frames
        incremental: bool = True  # images: recompute only what each window changes (Krypton); false: full copies

        def __post_init__(self):
            if self.window < 1 or self.stride < 1 or self.frames < 0:
                raise ValueError(f"occlusion: window={self.window} and stride={self.stride} must be >= 1, "
                                 f"frames={self.frames} >= 0")

    def _attribute(self, p):
        o = self.options
        x, targets = p.x, p.targets  # [N, C, *S], [N, K]
        (N, K), S = targets.shape, x.shape[2:]
        spans = [(o.window, o.stride)] * 2
        if len(S) == 3:  # [T, H, W]
            spans.insert(0, (o.frames or S[0], o.frames or S[0]))
        masks = window_masks(S, spans, x.device)  # [P, *S] True inside each window
        P = masks.shape[0]
        fill = torch.tensor(o.fill, dtype=x.dtype, device=x.device)
        scores = torch.empty(N * P, K, dtype=x.dtype, device=x.device)  # row r = n * P + window
        if not (o.incremental and len(S) == 2 and self._incremental(p, scores, S)):
            build = lambda r: torch.where(masks[r % P, None], fill, x[r // P])  # noqa: E731  [m, C, *S]
            for r, logits in p.rows_logits(N * P, build):
                scores[r] = logits.gather(1, targets[r // P])
        drops = p.logits.gather(1, targets).t()[:, :, None] - scores.view(N, P, K).permute(2, 0, 1)  # [K, N, P]
        m = masks.to(x.dtype).flatten(1)  # [P, prod(S)]
        per_pixel = (drops @ m) / m.sum(0)  # mean over the windows covering each pixel
        return {(INPUT, "drop"): per_pixel.view(K, N, *S).movedim(0, 1)}

    def _incremental(self, p, scores: torch.Tensor, S) -> bool:
        """Fill scores [N * P, K] by incremental inference; False (logged) where it cannot run."""
        o, x, targets = self.options, p.x, p.targets
        why = None
        if isinstance(p.model, torch.jit.ScriptModule):
            why = "a TorchScript model"
        elif p.precision != "fp32":
            why = f"precision={p.precision}"
        engine = None if why else _engine(p.model)
        if isinstance(engine, str):
            why = engine
        if why is None:
            hs, ws = starts(S[0], o.window, o.stride), starts(S[1], o.window, o.stride)
            ys = torch.tensor(hs, device=x.device).repeat_interleave(len(ws))
            xs = torch.tensor(ws, device=x.device).repeat(len(hs))
            size = (min(o.window, S[0]), min(o.window, S[1]))
            P = len(ys)
            progress = Attempt(p.progress)  # abandoned (its rows taken back) if full copies redo them
            progress.add(len(scores))
            try:
                for r, logits in engine.rows(x, ys, xs, size, o.fill, len(scores), p.max_batch, p.logits):
                    scores[r] = logits.gather(1, targets[r // P])
                    progress.step(len(r))
                return True
            except Exception as err:  # noqa: BLE001 - any failure: the full copies give the maps
                progress.abandon()  # the full copies count the rows again
                why = f"{type(err).__name__}: {err}"
        log.info("occlusion: full inference for %s (incremental inference not possible: %s)",
                 type(p.model).__name__, why)
        return False


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> Incremental, or why not


def _engine(model):
    """The model's traced Incremental (built once per model), or a string saying why there is none."""
    if model not in _ENGINES:
        try:
            _ENGINES[model] = Incremental(model)
        except Unsupported as err:
            _ENGINES[model] = str(err)
    return _ENGINES[model]


def starts(size: int, window: int, stride: int) -> list:
    """Window starts along one axis: every stride, plus one flush with the far edge."""
    window = min(window, size)
    out = list(range(0, size - window + 1, stride))
    return out if out[-1] == size - window else out + [size - window]


def window_masks(sizes: Sequence[int], spans: Sequence[tuple], device) -> torch.Tensor:
    """All windows of a grid: sizes (T,) H, W and (window, stride) per axis -> bool [P, *sizes]."""
    masks = torch.ones(1, dtype=torch.bool, device=device)  # one window over zero axes
    for size, (window, stride) in zip(sizes, spans):
        axis = torch.zeros(len(starts(size, window, stride)), size, dtype=torch.bool, device=device)
        for i, s in enumerate(starts(size, window, stride)):
            axis[i, s:s + min(window, size)] = True
        d = masks.dim() - 1  # axes built so far
        masks = (masks[:, None, ..., None] & axis.view(1, axis.shape[0], *(1,) * d, size)).flatten(0, 1)
    return masks
