"""Keeping freed memory for the next batch (glibc), instead of handing it back to the kernel.

With glibc's defaults, a block above the mmap threshold (128 KiB, raised on the fly to at most
32 MiB) is mapped for each allocation and unmapped when freed, and freed heap above 128 KiB is
trimmed. A CPU forward allocates and frees the same activations every batch (EfficientNet-Lite0,
batch 16: blocks of up to 77 MB), so each batch faults all of them in again, page by page, zeroed
by the kernel: on this project's 2-core VM the bare no-grad forward spent half its time in page
faults (31 images/s; 65 with freed memory kept, `scripts/bench.py --only allocator`).

`keep_freed_memory()` raises both thresholds (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD) to 1 GiB, so
freed blocks stay in the process and the next batch reuses them: peak memory stays what one batch
needs (it is not returned between batches). Process-wide, idempotent; `keep_freed_memory=false`
leaves glibc's defaults. A no-op (False) on other C libraries (macOS, musl), where mallopt is
absent or means something else.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
KEEP_UP_TO = 1 << 30  # blocks up to 1 GiB come from (and return to) the heap


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl has a mallopt that ignores these options
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks up to KEEP_UP_TO for reuse; True when applied."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_UP_TO)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO))
