"""Line plots of the evaluation results (drawn with OpenCV: no plotting dependency)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np

from pipeline.io.render import write_png

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def line_plot(series: Dict[str, np.ndarray], title: str, xlabel: str, ylabel: str,
              ylim=(0.0, 1.0), xticks: Optional[Sequence[str]] = None, size=(760, 460)) -> np.ndarray:
    """series: label -> y values over x = 0..len-1. Returns an RGB image."""
    w, h = size
    left, right, top, bottom = 60, 250, 40, 60
    img = np.full((h, w, 3), 255, np.uint8)
    x0, x1, y0, y1 = left, w - right, h - bottom, top
    cv2.rectangle(img, (x0, y1), (x1, y0), (0, 0, 0), 1)
    lo, hi = ylim
    font = cv2.FONT_HERSHEY_SIMPLEX
    for v in np.linspace(lo, hi, 5):
        y = int(y0 + (y1 - y0) * (v - lo) / (hi - lo))
        cv2.line(img, (x0, y), (x1, y), (225, 225, 225), 1)
        cv2.putText(img, f"{v:.2f}", (8, y + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    n = max((len(v) for v in series.values()), default=2)
    for i in range(n):
        x = int(x0 + (x1 - x0) * i / max(n - 1, 1))
        text = xticks[i] if xticks and i < len(xticks) else (f"{i / max(n - 1, 1):.2f}" if not xticks else "")
        if n <= 12 or i % max(1, n // 8) == 0:
            cv2.putText(img, text[:20], (x - 24, y0 + 16 + 12 * (i % 2)), font, 0.33, (0, 0, 0), 1, cv2.LINE_AA)
    for j, (name, ys) in enumerate(series.items()):
        colour = PALETTE[j % len(PALETTE)]
        pts = [(int(x0 + (x1 - x0) * i / max(len(ys) - 1, 1)),
                int(y0 + (y1 - y0) * (np.clip(v, lo, hi) - lo) / (hi - lo))) for i, v in enumerate(ys)]
        cv2.polylines(img, [np.array(pts, np.int32)], False, colour, 2, cv2.LINE_AA)
        cv2.line(img, (x1 + 12, top + 14 + 18 * j), (x1 + 32, top + 14 + 18 * j), colour, 2)
        cv2.putText(img, name[:30], (x1 + 38, top + 18 + 18 * j), font, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, title, (x0, 24), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, xlabel, (x0 + (x1 - x0) // 2 - 60, h - 18), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (8, top - 8), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def write_plots(out_dir: Path, run) -> List[Path]:
    """Mean deletion / insertion / ROAD curves and sanity-check correlations over all rows of a run
    (a pipeline.store.RunReader)."""
    found: Dict[str, Dict[str, np.ndarray]] = {"deletion": {}, "insertion": {}, "sanity": {}, "road_morf": {},
                                               "road_lerf": {}}
    for (technique, layer, output, metric), col in run.metrics().items():
        if metric in found and len(col):
            values = col[:]
            found[metric][f"{technique}/{layer}/{output}"] = values.reshape(-1, values.shape[-1]).mean(0)
    labels = run.attrs.get("sanity_labels")
    labels = ["original"] + list(labels) if labels is not None else None
    written = []
    for metric in ("deletion", "insertion"):
        if found[metric]:
            path = out_dir / "plots" / f"{metric}.png"
            write_png(path, line_plot(found[metric], f"{metric} curve (mean over inputs)",
                                      "fraction of pixels " + ("removed" if metric == "deletion" else "inserted"),
                                      "target probability"))
            written.append(path)
    for metric in ("road_morf", "road_lerf"):
        if found[metric]:
            path = out_dir / "plots" / f"{metric}.png"
            ticks = [f"p{i + 1}" for i in range(max(len(v) for v in found[metric].values()))]
            write_png(path, line_plot(found[metric], f"ROAD {metric[5:].upper()} curve (mean over inputs)",
                                      "i-th of evaluate.road_percentages removed", "target probability",
                                      xticks=ticks))
            written.append(path)
    if found["sanity"]:
        series = {k: np.concatenate([[1.0], v]) for k, v in found["sanity"].items()}
        path = out_dir / "plots" / "sanity.png"
        write_png(path, line_plot(series, "model randomization, top down (mean Spearman with original)",
                                  "re-initialized from the top down to", "rank correlation", ylim=(-0.2, 1.0), xticks=labels))
        written.append(path)
    return written
