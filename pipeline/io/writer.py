"""Keeps HDF5 and PNG writing off the compute path: a thread drains a bounded queue of batches.

Per batch, in this order: room for its rows is reserved in maps.h5 (DiskFull before anything is
written), the PNGs of its rows below `render.max_inputs` are written (each atomically), then its
rows are appended and committed. A committed row below `render.max_inputs` therefore always has
its PNGs; a run killed before the commit computes the batch again on resume and rewrites them.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from pipeline.contracts import Draw, Kind
from pipeline.data.base import Item
from pipeline.io.render import png_name, render_input
from pipeline.store import MapsFile, RowBatch
from pipeline.summaries import Summaries


@dataclass
class BatchRecord:
    items: List[Item]
    display: np.ndarray  # [N, S, S, 3] uint8
    targets: np.ndarray  # [N, K] int64
    scores: np.ndarray  # [N, K] float32 softmax probability of each target
    logits: np.ndarray  # [N, K] float32 logit of each target
    maps: Dict[Tuple[str, str, str], np.ndarray] = field(default_factory=dict)  # (technique, layer, output)


class AsyncWriter:
    """`put()` batches (or lists of skipped records) from the compute loop; a thread writes them.
    An error in the thread is raised, itself (with the thread's traceback), by the next put() or by
    close(); abort() stops the thread without raising and returns that error, if any. The caller
    owns `maps_file` and closes it."""

    def __init__(self, maps_file: MapsFile, out_dir: Path, render_cfg, kinds: Dict[str, Dict[str, Kind]],
                 class_name: Callable[[int], str], depth: int = 4, draw: Optional[Dict[str, Draw]] = None,
                 summaries: Optional[Summaries] = None):
        self.file, self.out_dir, self.render, self.kinds, self.class_name = maps_file, Path(out_dir), render_cfg, kinds, class_name
        self.draw = draw or {}  # technique -> Technique.draw(): labels, boxes, display mode
        self.summaries = summaries  # updated with every committed batch (pipeline.summaries)
        self.pngs = 0
        self._queue: "queue.Queue[Optional[object]]" = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="maps-writer", daemon=True)
        self._thread.start()

    def put(self, record) -> None:
        self._check()
        while True:  # a bounded wait, so a writer that failed meanwhile is noticed
            try:
                self._queue.put(record, timeout=0.5)
                return
            except queue.Full:
                self._check()

    def close(self) -> None:
        """Write everything queued, stop the thread; raises the thread's error, if any."""
        self._stop()
        self._check()

    def abort(self) -> Optional[BaseException]:
        """Stop the thread (after the batches already queued) without raising; returns its error."""
        self._stop()
        return self._error

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

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
            except BaseException as err:  # noqa: BLE001 - raised in the main thread by put/close
                self._error = err

    def _write(self, r: BatchRecord) -> None:
        start, limit = self.file.rows, self.render.max_inputs
        drawn = [bool(self.render.png) and (limit is None or start + i < limit) for i in range(len(r.items))]
        rows = RowBatch(ids=[it.id for it in r.items], sources=[it.source for it in r.items],
                        frames=[it.frame for it in r.items], targets=r.targets, scores=r.scores, logits=r.logits,
                        maps=self.file.as_stored(r.maps),
                        pngs=[png_name(it.id) if d else "" for it, d in zip(r.items, drawn)])
        self.file.reserve_rows(rows)  # room for the rows first: DiskFull before any write
        for i, item in enumerate(r.items):
            if drawn[i]:
                self._draw(r, i, item)
        self.file.append_rows(rows)  # commit: only now are these rows part of the run
        if self.summaries:
            self.summaries.update(rows.maps, rows.ids)

    def _draw(self, r: BatchRecord, i: int, item: Item) -> None:
        """The PNGs of row i of a batch, one per technique."""
        # a NaN score: a detection model's empty slot (fewer boxes than targets; they come last), not drawn
        targets = [(self.class_name(int(t)), float(s)) for t, s in zip(r.targets[i], r.scores[i]) if not np.isnan(s)]
        for technique, kinds in self.kinds.items():
            maps = {(l, o): d[i] for (t, l, o), d in r.maps.items() if t == technique}
            if render_input(self.out_dir, item.id, technique, kinds, maps, r.display[i], targets, self.render,
                            draw=self.draw.get(technique)):
                self.pngs += 1
