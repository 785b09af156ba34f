"""Disk space: reserve it before HDF5 writes, write files atomically, and one clear error when full.

HDF5 does not survive a failed write: a write that fails with ENOSPC half-way through a flush
leaves metadata that points at chunks never written (seen: a segfault, then `bad heap index` or
`addr overflow` on every reopen). So maps.h5 is never written without the room for it: before
each write the store asks for the bytes it may need with `reserve()`, which allocates them past
the end of the file (Linux `fallocate(FALLOC_FL_KEEP_SIZE)`: the file's size does not change, the
blocks are its own, and a later write into them cannot fail for lack of space). When the
filesystem has no such call (some network filesystems), `reserve()` compares the request with the
free space instead. Either way a request that does not fit raises `DiskFull` before HDF5 writes a
byte, so the committed rows stay readable and a resume after freeing space goes on from them.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

from pipeline.errors import RunError

_FALLOC_FL_KEEP_SIZE = 1
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV, errno.EBADF}


class DiskFull(RunError):
    def __init__(self, path: Path | str, needed: Optional[int] = None):
        self.path = Path(path)
        folder = self.path.parent if not self.path.is_dir() else self.path
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        self.free = free_bytes(folder)
        need = f", {human(needed)} needed" if needed else ""
        super().__init__(f"no space left on device writing {self.path} ({human(self.free)} free on "
                         f"{mount_point(folder)}{need}); free some space and run the same command again "
                         "to resume: the rows already committed are kept")


def human(n: Optional[int]) -> str:
    if n is None:
        return "? bytes"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def free_bytes(folder: Path | str) -> Optional[int]:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def mount_point(folder: Path | str) -> str:
    path = Path(os.path.abspath(folder))
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)


def is_disk_full(err: BaseException) -> bool:
    """An OSError (or h5py's OSError/RuntimeError with HDF5's message) for a full disk or quota."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "errno = 28" in text or "Disk quota exceeded" in text


def _fallocate() -> Optional[Callable[..., int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _fallocate()


def reserve(fd: int, nbytes: int, path: Path | str) -> bool:
    """Make sure the next `nbytes` past the end of the file behind `fd` can be written: allocate
    them (True), or, where the filesystem cannot, check the free space (False). Raises DiskFull."""
    nbytes = int(max(0, nbytes))
    if _FALLOCATE is not None:
        size = os.fstat(fd).st_size
        if _FALLOCATE(fd, _FALLOC_FL_KEEP_SIZE, size, nbytes) == 0:
            return True
        code = ctypes.get_errno()
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskFull(path, nbytes)
        if code not in _UNSUPPORTED:
            raise OSError(code, os.strerror(code), str(path))
    free = free_bytes(Path(path).parent)
    if free is not None and free < nbytes:
        raise DiskFull(path, nbytes)
    return False


def release(path: Path | str) -> None:
    """Free the blocks `reserve()` allocated past the end of a closed file that no write used
    (truncating a file to its own size drops them); without this they stay allocated, unseen by
    `ls` but counted by `du` and the quota, after the run. A file gone or read-only is left."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return
    try:
        os.ftruncate(fd, os.fstat(fd).st_size)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, renamed into place when
    complete: a reader (a concurrent job, the report) never sees half a file, and a write that
    fails (DiskFull) leaves the previous file, or none, and no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        if is_disk_full(err):
            raise DiskFull(path, len(data)) from None
        raise


def remove_stale_temporaries(folder: Path) -> int:
    """Delete `.<name>.<pid>.tmp` files left under `folder` by a run killed mid-write (call it
    while holding the run-dir lock, so no live writer owns them); returns how many."""
    count = 0
    if not folder.is_dir():
        return 0
    for tmp in folder.rglob(".*.tmp"):
        try:
            tmp.unlink()
            count += 1
        except OSError:
            pass
    return count
