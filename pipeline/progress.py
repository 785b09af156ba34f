"""Progress that work reports as it goes: `progress.add(units)` announces work, `progress.step(units)`
reports some of it done. The runner passes one to data-free techniques (`generate(progress=...)`,
units: optimization steps × rows) and to the per-batch `Pass` (units: rows of an expanded batch,
SmoothGrad samples, IG steps, masks, occluded copies, deletion/insertion steps). Code that is
given none reports to `NO_PROGRESS`, which does nothing."""
from __future__ import annotations

from typing import Callable, Optional


class Progress:
    """Counts announced and done units; `on_change(done, total)` is called after each change."""

    def __init__(self, on_change: Optional[Callable[[float, float], None]] = None):
        self.total = 0.0
        self.done = 0.0
        self._on_change = on_change

    def add(self, units: float) -> None:
        self.total += units
        self._changed()

    def step(self, units: float = 1) -> None:
        self.done = min(self.total, self.done + units) if self.total else self.done + units
        self._changed()

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.done, self.total)


class _NoProgress(Progress):
    def add(self, units: float) -> None:
        pass

    def step(self, units: float = 1) -> None:
        pass


NO_PROGRESS = _NoProgress()
