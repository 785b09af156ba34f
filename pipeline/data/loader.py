"""Decoding inputs into batches, in worker processes that never outlive the run.

With `num_workers > 0`, items are decoded and preprocessed in worker processes started from a
fork server (multiprocessing's "forkserver"), never forked from the main process, so a worker holds
none of the main process's open files (maps.h5 and its HDF5 lock, the run-dir lock) and none of
its threads. A worker

* dies with the run: the kernel kills it when its parent (the fork server, which itself exits when
  the main process is gone) dies (Linux PR_SET_PDEATHSIG), and it exits at end-of-file on its task
  pipe, which the main process held alone;
* ignores SIGINT and SIGTERM: the main process decides when to stop and then closes the pipes;
* decodes one item at a time from its own pipe, so the loader knows which item each worker holds.
  A worker killed mid-item (the OOM killer on a huge image) costs that item only: it becomes a
  skipped record ("decoder died ..."), a new worker takes over the items queued behind it, and
  the run goes on. Workers dying on `MAX_DEATHS_IN_A_ROW` items in a row stop the run.

Only `BadItem` (an input that cannot be read or decoded, a crop that does not fit) becomes a
skipped record. Any other exception while decoding is a bug: it stops the run with the worker's
traceback (`DecodeError`).
"""
from __future__ import annotations

import collections
import copy
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Deque, Dict, Iterator, List, Optional, Sequence

import numpy as np

from pipeline.data.base import BadItem, Item, Skip, Source, prepare_array
from pipeline.preprocess import Preprocess

if TYPE_CHECKING:  # torch is imported lazily: decoder workers need none of it
    import torch

MAX_DEATHS_IN_A_ROW = 8  # workers killed on this many consecutive items: something else is wrong
_WORKER_MODULES = ["pipeline.data.loader", "pipeline.data.images", "pipeline.data.video"]


@dataclass
class Batch:
    items: List[Item]  # the decoded inputs, in order
    x: Optional["torch.Tensor"]  # [N, 3, S, S] model input (None when every item failed)
    display: Optional[np.ndarray]  # [N, S, S, 3] uint8, the crop the model saw
    skipped: List[Skip]  # items of this batch that could not be used


class DecodeError(RuntimeError):
    """An unexpected exception while decoding an input (a bug, not a bad input)."""


def decode(source: Source, item: Item, crop, pre: Preprocess, min_side: Optional[int] = None):
    """One item -> (x float32 [3, S, S] or [3, T, S, S], display uint8); raises BadItem."""
    return prepare_array(source.read(item, min_side), crop, pre)


def _make_batch(items: List[Item], decoded: List[tuple], skipped: List[Skip]) -> Batch:
    import torch

    if not items:
        return Batch([], None, None, skipped)
    return Batch(items, torch.from_numpy(np.stack([d[0] for d in decoded])), np.stack([d[1] for d in decoded]),
                 skipped)


class Loader:
    """Batches of `items` from `source`, in order: `for batch in loader` (each batch holds the
    decoded items and the skipped ones among them). Use as a context manager, or call `close()`:
    workers are stopped there, never in `__del__`."""

    def __init__(self, source: Source, items: Sequence[Item], crop, pre: Preprocess, batch_size: int,
                 num_workers: int, min_side: Optional[int] = None, prefetch: int = 2):
        self.source, self.items, self.crop, self.pre = source, list(items), crop, pre
        self.batch_size, self.num_workers, self.min_side = max(1, batch_size), num_workers, min_side
        self.prefetch = max(1, prefetch)
        self._pool: Optional[_Pool] = None

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if self.num_workers <= 0:
            yield from self._in_process()
            return
        self.close()
        self._pool = _Pool(self)
        yield from self._pool.batches()

    def _in_process(self) -> Iterator[Batch]:
        for start in range(0, len(self.items), self.batch_size):
            chunk, decoded, good, skipped = self.items[start:start + self.batch_size], [], [], []
            for item in chunk:
                try:
                    decoded.append(decode(self.source, item, self.crop, self.pre, self.min_side))
                    good.append(item)
                except BadItem as err:
                    skipped.append(Skip(item.id, item.source, item.frame, str(err)))
            yield _make_batch(good, decoded, skipped)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_loader(source: Source, items: Sequence[Item], crop, pre: Preprocess, batch_size: int,
                num_workers: int, min_side: Optional[int] = None) -> Loader:
    return Loader(source, items, crop, pre, batch_size, num_workers, min_side)


# -- worker processes ------------------------------------------------------------------------------
def context() -> mp.context.BaseContext:
    """The start method for decoder workers: forkserver where the platform has it, else spawn."""
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_WORKER_MODULES)
    return ctx


def warm_up() -> None:
    """Start the fork server now (it imports the decoding modules once), so that the first
    workers start fast; a no-op where there is none."""
    ctx = context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def _worker_main(conn, source: Source, crop, pre: Preprocess, min_side: Optional[int]) -> None:
    """Decode the items sent on `conn`, one at a time, until end-of-file or None."""
    _die_with_parent()
    if os.getppid() == 1:  # the parent died before the line above took effect
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import cv2

        cv2.setNumThreads(1)  # workers are the parallelism; safe here (not forked from a user of OpenCV's pool)
    except ImportError:
        pass
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        index, item = task
        try:
            x, display = decode(source, item, crop, pre, min_side)
            reply = (index, x, display, None, None)
        except BadItem as err:
            reply = (index, None, None, str(err), None)
        except Exception:  # noqa: BLE001 - a bug: sent back with its traceback, the run stops
            reply = (index, None, None, None, traceback.format_exc())
        try:
            conn.send(reply)
        except (OSError, EOFError):
            return


def _lean(source: Source) -> Source:
    """A copy of `source` without its item lists, which a worker does not need (items come with
    each task): a million-image folder is not pickled to every worker."""
    lean = copy.copy(source)
    lean.items, lean.skipped = [], []
    return lean


class _Worker:
    def __init__(self, ctx, loader: Loader):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, name="pipeline-decoder", daemon=True,
                                args=(child, _lean(loader.source), loader.crop, loader.pre, loader.min_side))
        self.proc.start()
        child.close()
        self.held: Deque[int] = collections.deque()  # indices sent, oldest first (the one being decoded)


_END = object()


class _Pool:
    """The workers of one iteration and the collector thread that feeds them, reads their replies,
    replaces dead ones and hands complete batches to the consumer through a queue."""

    def __init__(self, loader: Loader):
        self.loader, self.ctx = loader, context()
        n = len(loader.items)
        self.capacity = (loader.prefetch + 1) * loader.batch_size  # items sent or decoded but not yet consumed
        self.depth = max(2, -(-loader.batch_size // loader.num_workers))  # items queued per worker
        self.pending: Deque[int] = collections.deque(range(n))
        self.done: Dict[int, tuple] = {}  # index -> ("ok", x, display) | ("skip", reason)
        self.emitted = 0  # items handed to the consumer, in order
        self.consumed = 0  # items the consumer has taken
        self.deaths_in_a_row = 0
        self.stopping = False
        self.out: "queue.Queue[object]" = queue.Queue()
        self.wake_r, self.wake_w = os.pipe()
        self.workers: List[_Worker] = [_Worker(self.ctx, loader) for _ in range(max(1, min(loader.num_workers, n)))] if n else []
        self.thread = threading.Thread(target=self._collect, name="pipeline-loader", daemon=True)
        self.thread.start()

    # -- consumer side ---------------------------------------------------------------------------
    def batches(self) -> Iterator[Batch]:
        while True:
            got = self.out.get()
            if got is _END:
                return
            if isinstance(got, BaseException):
                raise got
            self.consumed += len(got.items) + len(got.skipped)
            self._wake()
            yield got

    def close(self) -> None:
        self.stopping = True
        self._wake()
        self.thread.join(timeout=10)
        for w in self.workers:
            try:
                w.conn.close()  # end-of-file: the worker exits
            except OSError:
                pass
        for w in self.workers:
            w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=2)
        self.workers = []
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    # -- collector thread ------------------------------------------------------------------------
    def _collect(self) -> None:
        try:
            n = len(self.loader.items)
            while not self.stopping and self.emitted < n:
                self._feed()
                self._emit()
                if self.emitted >= n:
                    break
                ready = wait([w.conn for w in self.workers] + [w.proc.sentinel for w in self.workers] + [self.wake_r],
                             timeout=5.0)
                for obj in ready:
                    if obj == self.wake_r:
                        os.read(self.wake_r, 4096)
                for w in list(self.workers):
                    if w.conn in ready:
                        self._receive(w)
                for w in list(self.workers):
                    if w.proc.sentinel in ready or not w.proc.is_alive():
                        self._replace(w)
            self.out.put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self.out.put(err)

    def _feed(self) -> None:
        while self.pending and not self.stopping:
            in_flight = sum(len(w.held) for w in self.workers)
            if in_flight + len(self.done) + self.emitted - self.consumed >= self.capacity:
                return
            w = min(self.workers, key=lambda w: len(w.held))
            if len(w.held) >= self.depth:
                return
            index = self.pending.popleft()
            try:
                w.conn.send((index, self.loader.items[index]))
            except (OSError, EOFError):  # it died: _replace gives the item to another worker
                self.pending.appendleft(index)
                return
            w.held.append(index)

    def _emit(self) -> None:
        items, bs = self.loader.items, self.loader.batch_size
        while self.emitted < len(items):
            end = min(len(items), self.emitted + bs)
            if not all(i in self.done for i in range(self.emitted, end)):
                return
            good, decoded, skipped = [], [], []
            for i in range(self.emitted, end):
                result = self.done.pop(i)
                item = items[i]
                if result[0] == "ok":
                    good.append(item)
                    decoded.append(result[1:])
                else:
                    skipped.append(Skip(item.id, item.source, item.frame, result[1]))
            self.emitted = end
            self.out.put(_make_batch(good, decoded, skipped))

    def _receive(self, w: _Worker) -> None:
        while True:
            try:
                if not w.conn.poll():
                    return
                index, x, display, reason, error = w.conn.recv()
            except (EOFError, OSError):
                return  # it died mid-reply: _replace handles it
            held = w.held.popleft()
            assert held == index, f"decoder reply for item {index}, expected {held}"
            item = self.loader.items[index]
            if error is not None:
                raise DecodeError(f"decoding {item.id} ({item.source}) failed with an unexpected error "
                                  f"(not a bad input, so the run stops):\n{error}")
            self.deaths_in_a_row = 0
            self.done[index] = ("ok", x, display) if reason is None else ("skip", reason)

    def _replace(self, w: _Worker) -> None:
        self._receive(w)  # replies it sent before dying
        w.proc.join(timeout=5)
        code = w.proc.exitcode
        if self.stopping:
            return
        if code is None:
            return  # still alive after all
        self.workers.remove(w)
        w.conn.close()
        if code >= 0:
            raise DecodeError(f"a decoder worker exited with code {code} (pid {w.proc.pid}) while decoding; "
                              "this is a bug, not a bad input")
        if w.held:
            index = w.held.popleft()
            item = self.loader.items[index]
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            self.done[index] = ("skip", f"decoder died while decoding it: killed by {name}{hint}")
            self.deaths_in_a_row += 1
            if self.deaths_in_a_row >= MAX_DEATHS_IN_A_ROW:
                raise DecodeError(f"decoder workers died on {self.deaths_in_a_row} inputs in a row "
                                  f"(last {item.id}: killed by {name}); stopping")
        self.pending.extendleft(reversed(w.held))  # queued behind the dead item: decode them elsewhere
        self.workers.append(_Worker(self.ctx, self.loader))
