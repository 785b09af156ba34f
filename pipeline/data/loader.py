"""Decoding inputs into batches, in worker processes that never outlive the run.

With `num_workers > 0`, items are decoded, cropped and resized in worker processes that are fresh
interpreters (`python -c`), never forks of the main process: a worker holds none of the main
process's open files (maps.h5 and its HDF5 lock, the run-dir lock) or threads, and never imports
the caller's `__main__`. A worker

* dies with the run: the kernel SIGKILLs it when the main process dies, however it dies (Linux
  PR_SET_PDEATHSIG), and it exits at end-of-file on its socket, whose other end only the main
  process holds;
* ignores SIGINT and SIGTERM: the main process decides when to stop, then closes the sockets;
* decodes one item at a time from its own socket, so the loader knows which item each worker
  holds. A worker killed mid-item (the OOM killer on a huge image) costs that item only: it
  becomes a skipped record ("decoder died ..."), a new worker takes over the items queued behind
  it, and the run goes on. Workers dying on `MAX_DEATHS_IN_A_ROW` items in a row stop the run.

A worker sends the uint8 crop the model sees, not the float input (a quarter of the bytes); the
batch is normalised once in the loader's thread (`model_input`), to the bit as `base.normalise`.

Only `BadItem` (an input that cannot be read or decoded, a crop that does not fit) becomes a
skipped record. Any other exception while decoding is a bug: it stops the run with the worker's
traceback (`DecodeError`).
"""
from __future__ import annotations

import collections
import copy
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from pipeline.data.base import BadItem, Item, Skip, Source, model_crop
from pipeline.preprocess import Preprocess

if TYPE_CHECKING:  # torch is imported lazily: decoder workers need none of it
    import torch

MAX_DEATHS_IN_A_ROW = 8  # workers killed on this many consecutive items: something else is wrong


@dataclass
class Batch:
    items: List[Item]  # the decoded inputs, in order
    x: Optional["torch.Tensor"]  # [N, 3, S, S] model input (None when every item failed)
    display: Optional[np.ndarray]  # [N, S, S, 3] uint8, the crop the model saw
    skipped: List[Skip]  # items of this batch that could not be used

    def pin_memory(self) -> "Batch":
        """This batch with its model input in page-locked memory (same strides, channels-last
        kept), so `x.to(cuda, non_blocking=True)` copies asynchronously. Done in the loader's
        thread, off the compute path; needs CUDA."""
        if self.x is None or self.x.is_pinned():
            return self
        return Batch(self.items, self.x.pin_memory(), self.display, self.skipped)


class DecodeError(RuntimeError):
    """An unexpected exception while decoding an input (a bug, not a bad input)."""


def decode(source: Source, item: Item, crop, pre: Preprocess, min_side: Optional[int] = None) -> np.ndarray:
    """One item -> the crop the model sees, uint8 [S, S, 3] (a clip: [T, S, S, 3]); raises BadItem.
    Workers send this, a quarter of the float input's bytes; the batch is normalised here."""
    return model_crop(source.read(item, min_side), crop, pre)


def model_input(display: np.ndarray, pre: Preprocess) -> "torch.Tensor":
    """uint8 [N, S, S, 3] (clips [N, T, S, S, 3]) -> the model input, float32 [N, 3, S, S]
    ([N, 3, T, S, S]): (x / 255 - mean) / std, equal to the bit to base.normalise of each item
    (tested). Images stay channels-last in memory (strides of [N, S, S, 3], as they are decoded):
    CPU convolutions run faster on them (EfficientNet-Lite0 here: ~1.35x) and give each row the
    same numbers wherever it sits in the batch; clips are contiguous [N, 3, T, S, S]."""
    import torch

    t = torch.from_numpy(display)
    if t.ndim == 4:
        t = t.permute(0, 3, 1, 2)  # a view: channels-last strides, kept by .to() below
    else:
        t = t.permute(0, 4, 1, 2, 3).contiguous()
    t = t.to(torch.float32)
    shape = (1, 3) + (1,) * (t.ndim - 2)
    mean = torch.tensor(pre.mean, dtype=torch.float32).reshape(shape)
    std = torch.tensor(pre.std, dtype=torch.float32).reshape(shape)
    return t.div_(255.0).sub_(mean).div_(std)


def _make_batch(items: List[Item], displays: List[np.ndarray], skipped: List[Skip], pre: Preprocess,
                pin_memory: bool = False) -> Batch:
    if not items:
        return Batch([], None, None, skipped)
    display = np.stack(displays)
    batch = Batch(items, model_input(display, pre), display, skipped)
    return batch.pin_memory() if pin_memory else batch


class Loader:
    """Batches of `items` from `source`, in order: `for batch in loader` (each batch holds the
    decoded items and the skipped ones among them). Use as a context manager, or call `close()`:
    workers are stopped there, never in `__del__`."""

    def __init__(self, source: Source, items: Sequence[Item], crop, pre: Preprocess, batch_size: int,
                 num_workers: int, min_side: Optional[int] = None, prefetch: int = 2,
                 spares: Optional["SpareDecoders"] = None, pin_memory: bool = False):
        self.source, self.items, self.crop, self.pre = source, list(items), crop, pre
        self.batch_size, self.num_workers, self.min_side = max(1, batch_size), num_workers, min_side
        self.prefetch = max(1, prefetch)
        self.spares = spares  # processes started ahead (while the model loaded), taken first
        self.pin_memory = pin_memory  # page-locked batches (CUDA runs), pinned in the loader's thread
        self._pool: Optional[_Pool] = None

    def start(self) -> "Loader":
        """Start the workers now (they begin decoding ahead while the caller gets ready); the
        first iteration takes their batches. Without workers a no-op."""
        if self.num_workers > 0 and self._pool is None:
            self._pool = _Pool(self)
        return self

    def __iter__(self) -> Iterator[Batch]:
        if self.num_workers <= 0:
            yield from self._in_process()
            return
        pool = self.start()._pool  # one iteration per pool; close() (or the end of the iteration) stops it
        try:
            yield from pool.batches()
        finally:
            if self._pool is pool:
                self.close()

    def _in_process(self) -> Iterator[Batch]:
        for start in range(0, len(self.items), self.batch_size):
            chunk, decoded, good, skipped = self.items[start:start + self.batch_size], [], [], []
            for item in chunk:
                try:
                    decoded.append(decode(self.source, item, self.crop, self.pre, self.min_side))
                    good.append(item)
                except BadItem as err:
                    skipped.append(Skip(item.id, item.source, item.frame, str(err)))
            yield _make_batch(good, decoded, skipped, self.pre, self.pin_memory)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "Loader":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def make_loader(source: Source, items: Sequence[Item], crop, pre: Preprocess, batch_size: int,
                num_workers: int, min_side: Optional[int] = None) -> Loader:
    return Loader(source, items, crop, pre, batch_size, num_workers, min_side)


# -- worker processes ------------------------------------------------------------------------------
def _die_with_parent(parent: int) -> bool:
    """Linux: have the kernel SIGKILL this process when its parent dies; False if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    return os.getppid() == parent


def worker_main(fd: int, parent: int) -> None:
    """A decoder worker (`python -c ...` started by _Worker): the first message on the socket `fd`
    is (source, crop, preprocess, min_side); then it decodes the (index, item) tasks sent on it,
    one at a time, until end-of-file."""
    if not _die_with_parent(parent):
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import cv2

    cv2.setNumThreads(1)  # the workers are the parallelism
    conn = Connection(fd)
    try:
        source, crop, pre, min_side = conn.recv()
    except (EOFError, OSError):
        return
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        index, item = task
        try:
            reply = (index, decode(source, item, crop, pre, min_side), None, None)
        except BadItem as err:
            reply = (index, None, str(err), None)
        except Exception:  # noqa: BLE001 - a bug: sent back with its traceback, the run stops
            reply = (index, None, None, traceback.format_exc())
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


def _spawn() -> Tuple[subprocess.Popen, Connection]:
    """A decoder process, not yet told what to decode: a fresh interpreter (`python -c`), not a
    fork, talking over a socket pair whose other end only this process holds. It imports only the
    decoding modules (never the caller's __main__, so a script without an `if __name__ ==
    "__main__"` guard is safe) and inherits no open file but its socket."""
    ours, theirs = socket.socketpair()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # what we import, it finds
    code = f"from pipeline.data.loader import worker_main; worker_main({theirs.fileno()}, {os.getpid()})"
    proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()], env=env,
                            stdin=subprocess.DEVNULL, close_fds=True)
    theirs.close()
    return proc, Connection(ours.detach())


def _stop(proc: subprocess.Popen, conn: Connection) -> None:
    conn.close()  # end-of-file: the worker exits
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class SpareDecoders:
    """Decoder processes started ahead of their Loader, so that their start-up (an interpreter
    importing numpy and OpenCV, about 0.4 s) overlaps other work, such as loading the model:
    `start(n)` spawns them (from the main thread: PR_SET_PDEATHSIG follows the spawning thread),
    a Loader given `spares=` adopts them, and `close()` (or the end of the `with`) stops those
    never adopted."""

    def __init__(self):
        self._ready: List[Tuple[subprocess.Popen, Connection]] = []

    def start(self, n: int) -> None:
        self._ready += [_spawn() for _ in range(max(0, n - len(self._ready)))]

    def take(self) -> Optional[Tuple[subprocess.Popen, Connection]]:
        return self._ready.pop(0) if self._ready else None

    def __len__(self) -> int:
        return len(self._ready)

    def close(self) -> None:
        while self._ready:
            _stop(*self._ready.pop())

    def __enter__(self) -> "SpareDecoders":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Worker:
    """One decoder process (a spare started ahead when there is one, else a new one, see _spawn),
    told what to decode by its first message."""

    def __init__(self, loader: Loader):
        setup = (_lean(loader.source), loader.crop, loader.pre, loader.min_side)
        spare = loader.spares.take() if loader.spares is not None else None
        self.proc, self.conn = spare or _spawn()
        self.held: Deque[int] = collections.deque()  # indices sent, oldest first (the one being decoded)
        try:
            self.conn.send(setup)
        except OSError:  # a spare that died while it waited: a new one instead
            if spare is None:
                raise
            _stop(self.proc, self.conn)
            self.proc, self.conn = _spawn()
            self.conn.send(setup)

    @property
    def pid(self) -> int:
        return self.proc.pid


_END = object()


class _Pool:
    """The workers of one iteration and the collector thread that feeds them, reads their replies,
    replaces dead ones and hands complete batches to the consumer through a queue."""

    def __init__(self, loader: Loader):
        self.loader = loader
        n = len(loader.items)
        self.capacity = (loader.prefetch + 1) * loader.batch_size  # items sent or decoded but not yet consumed
        self.depth = max(2, -(-loader.batch_size // loader.num_workers))  # items queued per worker
        self.pending: Deque[int] = collections.deque(range(n))
        self.done: Dict[int, tuple] = {}  # index -> ("ok", display) | ("skip", reason)
        self.emitted = 0  # items handed to the consumer, in order
        self.consumed = 0  # items the consumer has taken
        self.deaths_in_a_row = 0
        self.stopping = False
        self.out: "queue.Queue[object]" = queue.Queue()
        self.wake_r, self.wake_w = os.pipe()
        self.workers: List[_Worker] = [_Worker(loader) for _ in range(min(loader.num_workers, n))]
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
            w.conn.close()  # end-of-file: every worker exits (closed first, then waited on together)
        for w in self.workers:
            _stop(w.proc, w.conn)
        self.workers = []
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    # -- collector thread ------------------------------------------------------------------------
    def _collect(self) -> None:
        try:
            n = len(self.loader.items)
            while not self.stopping:
                self._feed()
                self._emit()
                if self.emitted >= n:
                    break
                ready = wait([w.conn for w in self.workers] + [self.wake_r], timeout=5.0)
                if self.wake_r in ready:
                    os.read(self.wake_r, 4096)
                for w in [w for w in self.workers if w.conn in ready]:
                    if not self._receive(w):
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
            except OSError:  # it died: its end-of-file comes next, and _replace requeues the item
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
                result, item = self.done.pop(i), items[i]
                if result[0] == "ok":
                    good.append(item)
                    decoded.append(result[1])
                else:
                    skipped.append(Skip(item.id, item.source, item.frame, result[1]))
            self.emitted = end
            self.out.put(_make_batch(good, decoded, skipped, self.loader.pre, self.loader.pin_memory))

    def _receive(self, w: _Worker) -> bool:
        """Read the replies waiting on w's socket; False at end-of-file (the worker is gone)."""
        while w.conn.poll():
            try:
                index, display, reason, error = w.conn.recv()
            except (EOFError, OSError):
                return False
            held = w.held.popleft()
            assert held == index, f"decoder reply for item {index}, expected {held}"
            item = self.loader.items[index]
            if error is not None:
                raise DecodeError(f"decoding {item.id} ({item.source}) failed with an unexpected error "
                                  f"(not a bad input, so the run stops):\n{error}")
            self.deaths_in_a_row = 0
            self.done[index] = ("ok", display) if reason is None else ("skip", reason)
        return True

    def _replace(self, w: _Worker) -> None:
        """A worker is gone: the item it was decoding becomes a skipped record ("decoder died"),
        the items queued behind it go to the others, and a new worker takes its place."""
        code = w.proc.wait()
        self.workers.remove(w)
        w.conn.close()
        if self.stopping:
            return
        if code >= 0:
            raise DecodeError(f"a decoder worker (pid {w.pid}) exited with code {code} while decoding; "
                              "this is a bug, not a bad input (its error is printed above)")
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
        self.workers.append(_Worker(self.loader))
