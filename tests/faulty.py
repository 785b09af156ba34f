"""Data sources that fail the way real inputs do, importable by decoder worker processes."""
import os
import signal
import sys
from pathlib import Path

from pipeline.data import FolderSource


class PoisonSource(FolderSource):
    """Decoding an input whose file name starts with "poison" kills the decoding process with
    SIGKILL, as the OOM killer does on a decompression bomb. Only ever inside a worker process."""

    def read(self, item, *args, **kwargs):
        if Path(item.id).name.startswith("poison"):
            if sys.argv[:1] != ["-c"]:  # a decoder worker is `python -c ...`; never kill the test process
                raise RuntimeError("PoisonSource kills its process: use it with num_workers > 0")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().read(item, *args, **kwargs)


class BuggySource(FolderSource):
    """Decoding an input whose file name starts with "buggy" raises a plain bug (not a bad input)."""

    def read(self, item, *args, **kwargs):
        if Path(item.id).name.startswith("buggy"):
            raise ValueError("a bug in the decoding code")
        return super().read(item, *args, **kwargs)
