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

    def withdraw(self, announced: float, done: float) -> None:
        """Take back units announced and done by work that was abandoned (it will be redone and
        counted again)."""
        self.total -= announced
        self.done = max(0.0, self.done - done)
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

    def withdraw(self, announced: float, done: float) -> None:
        pass


class Attempt(Progress):
    """Progress of work that may be abandoned and redone another way (incremental occlusion, the
    Ablation-CAM tail, before their fallback to whole forwards): it reports to `parent` as it goes,
    and `abandon()` takes its units back out of the parent, so the redo does not count them twice.
    (A bar that follows the parent does not move back: it waits until the redo passes it.)"""

    def __init__(self, parent: Progress):
        super().__init__()
        self.parent = parent

    def add(self, units: float) -> None:
        super().add(units)
        self.parent.add(units)

    def step(self, units: float = 1) -> None:
        before = self.done
        super().step(units)
        self.parent.step(self.done - before)

    def abandon(self) -> None:
        self.parent.withdraw(self.total, self.done)
        self.total = self.done = 0.0


NO_PROGRESS = _NoProgress()


def follow(bar, done: float, total: float) -> None:
    """Show a Progress on a tqdm bar (its total grows as work is announced)."""
    total, done = (int(v) if float(v).is_integer() else v for v in (total, done))
    if total != bar.total:
        bar.total = total
        bar.refresh()
    if done > bar.n:
        bar.update(done - bar.n)


class BatchProgress:
    """Moves the images bar within a batch of n inputs: the batch's work is split into `slots`
    equal parts (one per technique, one per evaluated heatmap, one for the sanity check), and a
    slot's Progress (the rows of its expanded batches) moves the bar through its part."""

    def __init__(self, bar, n: int, slots: int):
        self.bar, self.n, self.slots = bar, n, max(1, slots)
        self.start = bar.n  # a whole number: batches end whole, skipped inputs are whole
        self.position = 0.0  # inputs of this batch shown as done

    def slot(self, index: int) -> Progress:
        return Progress(lambda done, total: self.reach(index + (min(1.0, done / total) if total else 0.0)))

    def reach(self, slots_done: float) -> None:
        """Show `slots_done` of the batch's slots as done (the bar never moves back)."""
        position = self.n * min(1.0, slots_done / self.slots)
        if position > self.position + 1e-9:
            # moved to start + position, not by the step: float steps would add up past the
            # batch's end (and past the bar's total, which tqdm clamps with a warning)
            self.bar.update((self.start + position) - self.bar.n)
            self.position = position

    def finish(self) -> None:
        self.reach(self.slots)
