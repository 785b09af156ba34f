"""One writer per run dir: `with RunDirLock(run_dir):` for the whole run.

The lock is an exclusive `flock` on `<run_dir>/.pipeline.lock`, which records who holds it (pid,
host, start time, command). The kernel drops a flock when its holder dies, however it dies
(SIGKILL, a segfault, a lost node's NFS lease), so a lock left by a dead run never blocks: there is
no stale state to clean up, only a file whose text is overwritten by the next holder. Decoder
workers do not inherit it (they start from a fork server, see pipeline.data.loader).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from pipeline.config import ConfigError

LOCK_NAME = ".pipeline.lock"


class RunDirInUse(ConfigError):
    """Another live run is writing this run dir."""


class RunDirLock:
    def __init__(self, run_dir: Path | str, command: Optional[str] = None):
        self.run_dir, self.command = Path(run_dir), command
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunDirLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise RunDirInUse(
                    f"{self.run_dir} is being written by another run (pid {holder.get('pid', '?')}, host "
                    f"{holder.get('host', '?')}, since {holder.get('since', '?')}); wait for it to finish, "
                    "or use another run dir (hydra.run.dir=...)") from None
            raise ConfigError(f"cannot lock {self.path} ({err.strerror}); the filesystem may not support "
                              "file locks") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": self.command}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:  # a full disk: the lock holds without its note
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
