"""How a run stops early: SIGTERM handled like Ctrl-C, and what an attempt record says about it."""
from __future__ import annotations

import contextlib
import signal
from typing import Optional


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, scancel), handled like Ctrl-C: the run stops, its attempt recorded as interrupted."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises Terminated in the main thread, unless something else (e.g.
    submitit, which has its own preemption handling) already handles SIGTERM. A second SIGTERM
    while the run winds down kills it at once (the commits make that safe too)."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated(f"terminated by {signal.Signals(signum).name}")

    try:
        installed = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        if installed:
            signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        installed = False
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def interruption(err: BaseException) -> str:
    """How an attempt ended early, for its record: SIGTERM, SIGINT or the exception's class."""
    if isinstance(err, Terminated):
        return "SIGTERM"
    if isinstance(err, KeyboardInterrupt):
        return "SIGINT"
    return type(err).__name__


def first_line(err: BaseException) -> Optional[str]:
    """An exception's message for an attempt record: its first line, at most 300 characters."""
    text = str(err)
    return text.splitlines()[0][:300] if text else None
