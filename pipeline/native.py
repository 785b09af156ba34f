"""Small C kernels next to their Python module (pipeline/metrics/road_kernel.c), compiled on first
use with the machine's C compiler and loaded with ctypes; None where they cannot be (no compiler,
a failed build, `PIPELINE_NATIVE=0`), and the caller uses its torch code instead.

A build is cached under `$PIPELINE_CACHE_DIR` (default `$XDG_CACHE_HOME/pipeline` or
`~/.cache/pipeline`), `native/<name>-<key>.so`, the key hashing the source, the compiler command
and this CPU's instruction-set flags (`-march=native`: a home directory shared by cluster nodes of
different CPUs gets one build per kind of CPU). It is written under a temporary name and renamed,
so concurrent jobs (a multirun, Slurm array tasks) never load a half-written file."""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Optional

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno"]
NATIVE_FLAGS = ["-march=native"]
BASIC_FLAGS = ["-O3", "-fPIC", "-shared"]  # the second try, for a compiler that refuses one of the above

_loaded: Dict[Path, Optional[ctypes.CDLL]] = {}
_lock = threading.Lock()


def cache_dir() -> Path:
    if os.environ.get("PIPELINE_CACHE_DIR"):
        return Path(os.environ["PIPELINE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pipeline"


def _cpu_flags() -> str:
    """What -march=native compiles for: the CPU's flags line on Linux, else the processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def compiler() -> Optional[list]:
    """The C compiler command ($CC, else cc / gcc / clang on PATH), or None."""
    if os.environ.get("CC"):
        command = shlex.split(os.environ["CC"])
        return command if command and shutil.which(command[0]) else None
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def _build(source: Path, target: Path, cc: list) -> bool:
    """Compile source into target (through a temporary file renamed over it); False, with a
    warning, when that cannot be done (a compiler error, an unwritable cache)."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=target.parent)
        os.close(fd)
        for flags in (FLAGS + NATIVE_FLAGS, BASIC_FLAGS):
            start = time.perf_counter()
            done = subprocess.run(cc + flags + ["-o", tmp, str(source)], capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)
                log.info("built %s (%s, %.1f s) -> %s", source.name, " ".join(cc + flags),
                         time.perf_counter() - start, target)
                return True
        reason = done.stderr.strip()[-500:] or f"exit status {done.returncode}"
    except (OSError, subprocess.SubprocessError) as err:
        reason = f"{type(err).__name__}: {err}"
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    log.warning("could not build %s (%s) into %s: %s; using the torch code instead (slower)", source.name,
                " ".join(cc), target.parent, reason)
    return False


def target_path(source: Path, cc: list) -> Path:
    """Where the build of source with compiler cc for this CPU is cached."""
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(cc + FLAGS + NATIVE_FLAGS), _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    return cache_dir() / "native" / f"{source.stem}-{key}.so"


def _open(target: Path) -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL(str(target))
    except OSError as err:
        log.warning("could not load %s (%s): building it again", target, err)
        return None


def load(source: Path) -> Optional[ctypes.CDLL]:
    """The shared library built from the C file `source` (cached), or None where it cannot be."""
    with _lock:
        if source in _loaded:
            return _loaded[source]
        library = None
        cc = compiler()
        if os.environ.get("PIPELINE_NATIVE", "1") == "0":
            log.info("PIPELINE_NATIVE=0: %s not used; using the torch code instead", source.name)
        elif cc is None:
            log.warning("no C compiler found (cc, gcc, clang or $CC): %s not built; using the torch code instead "
                        "(slower)", source.name)
        else:
            target = target_path(source, cc)
            if target.is_file():
                library = _open(target)  # None: a damaged file (a disk that filled up), built again below
            if library is None and _build(source, target, cc):
                library = _open(target)
        _loaded[source] = library
        return library


def forget() -> None:
    """Drop what load() remembered (tests: a changed environment is looked at again)."""
    with _lock:
        _loaded.clear()
