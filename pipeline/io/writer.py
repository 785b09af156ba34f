"""Keeps HDF5 and PNG writing off the compute path: a thread drains a bounded queue of batches."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from pipeline.data.base import Item
from pipeline.io.h5 import MapsFile
from pipeline.io.render import render_input


@dataclass
class BatchRecord:
    items: List[Item]
    display: np.ndarray  # [N, S, S, 3] uint8
    targets: np.ndarray  # [N, K] int64
    scores: np.ndarray  # [N, K] float32 softmax probability of each target
    logits: np.ndarray  # [N, K] float32 logit of each target
    maps: Dict[Tuple[str, str, str], np.ndarray] = field(default_factory=dict)  # (technique, layer, output)


class AsyncWriter:
    """`put()` batches from the compute loop; a thread appends them to maps.h5 and renders PNGs
    for rows below `render.max_inputs`. An error in the thread is raised by the next put/close."""

    def __init__(self, maps_file: MapsFile, out_dir: Path, render_cfg, kinds: Dict[str, Dict[str, str]],
                 class_name: Callable[[int], str], depth: int = 4, draw: Optional[Dict[str, dict]] = None):
        self.file, self.out_dir, self.render, self.kinds, self.class_name = maps_file, Path(out_dir), render_cfg, kinds, class_name
        self.draw = draw or {}  # technique -> Technique.draw(): labels, boxes, display mode
        self.pngs = 0
        self._queue: "queue.Queue[Optional[object]]" = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="maps-writer", daemon=True)
        self._thread.start()

    def put(self, record) -> None:
        self._check()
        self._queue.put(record)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.file.close()
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing maps failed: {self._error}") from self._error

    def _loop(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            if self._error is not None:
                continue  # drain so put() never blocks forever
            try:
                if isinstance(record, list):
                    self.file.append_skipped(record)
                else:
                    self._write(record)
            except BaseException as err:  # noqa: BLE001 - surfaced in the main thread
                self._error = err

    def _write(self, r: BatchRecord) -> None:
        columns = {
            "id": np.array([it.id for it in r.items], dtype=object),
            "source": np.array([it.source for it in r.items], dtype=object),
            "frame": np.array([it.frame for it in r.items], dtype=np.int64),
            "target": r.targets, "score": r.scores, "logit": r.logits,
        }
        for (technique, layer, output), data in r.maps.items():
            columns[f"{technique}/{layer}/{output}"] = data
        start = self.file.append(columns)
        if not self.render.png:
            return
        limit = self.render.max_inputs
        for i, item in enumerate(r.items):
            if limit is not None and start + i >= limit:
                break
            targets = [(self.class_name(int(t)), float(s)) for t, s in zip(r.targets[i], r.scores[i])]
            for technique, kinds in self.kinds.items():
                maps = {(l, o): d[i] for (t, l, o), d in r.maps.items() if t == technique}
                if render_input(self.out_dir, item.id, technique, kinds, maps, r.display[i], targets, self.render,
                                draw=self.draw.get(technique)):
                    self.pngs += 1
