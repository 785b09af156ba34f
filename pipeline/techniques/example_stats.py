"""The combinable statistics of dataset_examples: the running top-k per channel is
pipeline.summaries.keep / select; here, histograms over fixed edges (so shards' counts add) with
quantiles read from them. Not a technique: helpers of pipeline/techniques/dataset_examples.py."""
from __future__ import annotations

import numpy as np


# Symmetric log-spaced edges: 0, then 4 bins per decade from 1e-3 to 1e4 on each side; scores beyond
# +-1e4 count in the outermost bins. Fixed, so histograms of any shards combine by adding counts.
_MAGNITUDES = 10.0 ** np.linspace(-3, 4, 29)
HIST_EDGES = np.concatenate([-_MAGNITUDES[::-1], [0.0], _MAGNITUDES])  # [59]: 58 bins
QUANTILE_LEVELS = np.array([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])


def histogram(scores: np.ndarray) -> np.ndarray:
    """Counts [C, B] of scores [C, R] over HIST_EDGES (NaN left out, the outermost bins open)."""
    C = scores.shape[0]
    bins = len(HIST_EDGES) - 1
    finite = ~np.isnan(scores)
    index = np.clip(np.searchsorted(HIST_EDGES, scores, side="right") - 1, 0, bins - 1)
    rows = np.broadcast_to(np.arange(C)[:, None], scores.shape)
    flat = (rows * bins + index)[finite]
    return np.bincount(flat, minlength=C * bins).reshape(C, bins).astype(np.int64)


def quantiles(hist: np.ndarray, levels: np.ndarray = QUANTILE_LEVELS) -> np.ndarray:
    """Quantiles [C, Q] read from histograms [C, B] over HIST_EDGES, linear within a bin (NaN for
    a channel with no counts). Within a bin's width of the exact value."""
    out = np.full((hist.shape[0], len(levels)), np.nan)
    for c, counts in enumerate(hist):
        total = counts.sum()
        if total == 0:
            continue
        cum = np.cumsum(counts)
        for j, q in enumerate(levels):
            target = q * total
            b = int(np.searchsorted(cum, target, side="left"))
            b = min(b, len(counts) - 1)
            before = cum[b - 1] if b else 0
            frac = (target - before) / counts[b] if counts[b] else 0.0
            lo, hi = HIST_EDGES[b], HIST_EDGES[b + 1]
            out[c, j] = lo + min(max(frac, 0.0), 1.0) * (hi - lo)
    return out
