"""keep_freed_memory: a block freed and allocated again is not faulted in again (glibc)."""
import subprocess
import sys

import pytest

from pipeline.allocator import _glibc

PROBE = """
import resource, torch
from pipeline.allocator import keep_freed_memory

def faults(rounds=8):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        torch.ones(16 << 20).sum()  # 64 MiB allocated, touched, freed (as activations are)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

default = faults()
applied = keep_freed_memory()
faults(1)  # the first allocation under the new thresholds faults the heap in once
print(default, applied, faults(16))  # 16 rounds: a round served by another thread's arena faults once
"""


@pytest.mark.skipif(_glibc() is None, reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    default, applied, kept = int(out[0]), out[1] == "True", int(out[2])
    assert applied
    assert default > 8 * 16000 * 0.9  # every round faults its 64 MiB in again: ~16k pages each
    # per round: without the setting every round faults its 64 MiB in again; with it, only a round
    # that glibc serves from a fresh arena (another thread held the main one) does, once per arena
    assert kept / 16 < default / 8 / 5, (default, kept)


def test_runs_apply_it_unless_switched_off(monkeypatch, make_cfg, image_folder, tiny_checkpoint, tmp_path):
    from pipeline import runner
    from tests.conftest import tiny_overrides

    calls = []
    monkeypatch.setattr(runner, "keep_freed_memory", lambda: calls.append(1) or True)
    overrides = tiny_overrides(tiny_checkpoint, image_folder, "technique=activations", "render.png=false")
    runner.run(make_cfg(*overrides), tmp_path / "on")
    runner.run(make_cfg(*overrides, "keep_freed_memory=false"), tmp_path / "off")
    assert calls == [1]


def test_runs_use_one_opencv_thread_and_put_it_back(monkeypatch, make_cfg, image_folder, tiny_checkpoint, tmp_path):
    import cv2

    from pipeline import runner
    from tests.conftest import tiny_overrides

    seen, real = [], runner._work
    monkeypatch.setattr(runner, "_work", lambda *a, **k: seen.append(cv2.getNumThreads()) or real(*a, **k))
    before = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        runner.run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=activations")), tmp_path / "a")
        assert seen == [1] and cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)
