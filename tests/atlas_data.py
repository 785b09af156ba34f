"""Synthetic run-level summaries in the agreed layout of issue 13 (dataset_examples,
channel_relevance) and a run dir holding them, for the atlas tests."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from pipeline.store import MapsFile

LEVELS = np.array([0.01, 0.1, 0.5, 0.9, 0.99])


def examples_summary(layers: Dict[str, Sequence[int]], k: int = 3, P: int = 16, bins: int = 20, bottom: int = 0,
                     inputs: int = 40, seed: int = 0) -> Dict[Tuple[str, str], np.ndarray]:
    """A dataset_examples summary: per layer the given channels, each with k patches whose pixels
    encode (channel, rank) (channel c's j-th patch is filled with value 10 * c + j in red)."""
    rng = np.random.default_rng(seed)
    edges = np.linspace(0.0, 4.0, bins + 1)
    out: Dict[Tuple[str, str], np.ndarray] = {}
    for layer, channels in layers.items():
        channels = np.asarray(channels, dtype=np.int64)
        C = len(channels)
        scores = np.sort(rng.uniform(0.5, 4.0, (C, k)), axis=1)[:, ::-1].astype(np.float32)
        ids = np.array([[f"img_{(7 * c + j) % inputs:03d}.png" for j in range(k)] for c in range(C)], dtype=object)
        patches = rng.integers(0, 255, (C, k, 3, P, P), dtype=np.uint8)
        for i, c in enumerate(channels):
            for j in range(k):
                patches[i, j, 0] = (10 * c + j) % 256
        hist = np.zeros((C, bins), np.int64)
        quantiles = np.zeros((C, len(LEVELS)), np.float32)
        for i in range(C):
            values = np.clip(rng.gamma(2.0, 0.4, inputs), 0, 3.999)
            hist[i], quantiles[i] = np.histogram(values, edges)[0], np.quantile(values, LEVELS)
        arrays = {
            "channels": channels, "top_scores": scores, "top_ids": ids,
            "top_argmax": rng.integers(0, 4, (C, k, 2)).astype(np.int64),
            "top_box": np.tile(np.array([2, 3, 10, 10], np.int64), (C, k, 1)), "top_patches": patches,
            "hist": hist, "hist_edges": edges,
            "quantiles": quantiles,
            "quantile_levels": LEVELS, "count": np.array(inputs, np.int64),
        }
        if bottom:
            arrays.update({"bottom_scores": np.sort(rng.uniform(0, 0.1, (C, bottom)), axis=1).astype(np.float32),
                           "bottom_ids": np.array([[f"low_{c}_{j}.png" for j in range(bottom)] for c in range(C)],
                                                  dtype=object),
                           "bottom_argmax": np.zeros((C, bottom, 2), np.int64),
                           "bottom_box": np.zeros((C, bottom, 4), np.int64),
                           "bottom_patches": np.full((C, bottom, 3, P, P), 40, np.uint8)})
        out.update({(layer, name): a for name, a in arrays.items()})
    return out


def relevance_summary(layers: Dict[str, int], classes: int, t: int = 3, empty: Sequence[int] = (),
                      seed: int = 1) -> Dict[Tuple[str, str], np.ndarray]:
    """A channel_relevance summary: per layer of `C` channels, class i's top channels are
    (i, i + 1, ...) mod C with decreasing values; classes in `empty` have no inputs."""
    rng = np.random.default_rng(seed)
    out: Dict[Tuple[str, str], np.ndarray] = {}
    for layer, C in layers.items():
        mean = rng.uniform(-0.1, 0.1, (classes, C)).astype(np.float32)
        count = np.full(classes, 5, np.int64)
        top = np.zeros((classes, t), np.int64)
        values = np.zeros((classes, t), np.float32)
        for i in range(classes):
            top[i] = [(i + j) % C for j in range(t)]
            mean[i, top[i]] = [1.0 - 0.1 * j + 0.01 * i for j in range(t)]
            values[i] = mean[i, top[i]]
        for i in empty:
            count[i], top[i], values[i], mean[i] = 0, -1, np.nan, np.nan
        out.update({(layer, "mean"): mean, (layer, "count"): count, (layer, "top_channels"): top,
                    (layer, "top_values"): values})
    return out


def write_run(run_dir: Path, examples: Optional[dict], relevance: Optional[dict] = None,
              classes: Optional[Sequence[str]] = None) -> Path:
    """A run dir whose maps.h5 holds only these summaries (and the class names)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = MapsFile(run_dir / "maps.h5", {"model": "synthetic"}, {"model": "synthetic", "layers": "relu1,relu2"})
    try:
        for name, summary in (("dataset_examples", examples), ("channel_relevance", relevance)):
            if summary is not None:
                facts = {key: a for key, a in summary.items() if key[1] == "channels"}
                final = {key: a for key, a in summary.items() if key[1] != "channels"}
                f.write_summary(name, final, stats={}, facts=facts, rows=0)
        if classes is not None:
            f.write_classes(list(classes))
    finally:
        f.close()
    return run_dir
