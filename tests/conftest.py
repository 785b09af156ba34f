import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.config import CONF_DIR, register_configs
from pipeline.store import datasets
from tests.tinymodels import tiny_net

REPO = Path(__file__).resolve().parent.parent
# No test reads or writes the user's home: caches (top_activated's filter images, torch hub, timm)
# go under a fresh folder, for this process and every subprocess a test starts.
TEST_HOME = Path(tempfile.mkdtemp(prefix="pipeline-tests-home-"))
os.environ.update(HOME=str(TEST_HOME), XDG_CACHE_HOME=str(TEST_HOME / ".cache"))
os.environ.pop("PIPELINE_CACHE_DIR", None)
register_configs()
torch.set_num_threads(2)


def read_h5(path):
    """({dataset path: array}, {attribute: value}) of a whole HDF5 file."""
    with h5py.File(path, "r") as f:
        return {name: ds[()] for name, ds in datasets(f).items()}, dict(f.attrs)


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny tensors: faster than two on shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_cfg():
    """compose(overrides) against conf/ with the registered schemas."""

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


def write_images(folder: Path, n: int, size=(40, 48), seed: int = 0, prefix: str = "img") -> list:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        path = folder / f"{prefix}{i:03d}.png"
        cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, 5)
    write_images(folder / "sub", 2, prefix="deep")
    return folder


@pytest.fixture
def torchscript_model(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.jit.script(tiny_net()).save(str(path))
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path):
    path = tmp_path / "tiny_state.pt"
    torch.save(tiny_net().state_dict(), path)
    return path


def tiny_overrides(model_path, data_path, *extra):
    """Overrides for a fast run of TinyNet (a state-dict checkpoint) on 32 px inputs."""
    return (
        "model=checkpoint", f"model.path={model_path}", "model.arch=tests.tinymodels:TinyNet",
        "model.num_classes=10", "model.input_size=32", "model.resize=32",
        "data=folder", f"data.path={data_path}", "num_workers=0", "batch_size=3", *extra,
    )


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


def committed_rows(path) -> int:
    """The committed-row count of a maps.h5 being written (0 while it cannot be read)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs.get("rows", 0))
    except (OSError, KeyError, RuntimeError):
        return 0


class Gate:
    """Rations the forward passes of a run of tests.tinymodels:GateNet (see there): `env()` for the
    run's process, `until_rows(maps, n, proc)` grants forwards one at a time until n rows are
    committed, after which the run waits at its next forward until `open()`. No sleeps decide
    anything: the test waits on committed rows, however slow the machine is."""

    HANG = 900  # seconds: only a run that stopped moving altogether fails on this

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.granted = 0
        self._allow(0)

    def env(self) -> dict:
        env = subprocess_env()
        env["PIPELINE_TEST_GATE"] = str(self.folder)
        return env

    def _allow(self, n: int) -> None:
        tmp = self.folder / ".allowed"
        tmp.write_text(str(n))
        os.replace(tmp, self.folder / "allowed")

    def used(self) -> int:
        try:
            return int((self.folder / "used").read_text() or 0)
        except (OSError, ValueError):
            return 0

    def until_rows(self, maps_h5, n: int, proc) -> int:
        start = time.monotonic()
        while (rows := committed_rows(maps_h5)) < n:
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {n} rows were committed"
            assert time.monotonic() - start < self.HANG, "the run stopped moving"
            if self.used() >= self.granted:
                self.granted += 1
                self._allow(self.granted)
            time.sleep(0.002)
        return rows

    def open(self) -> None:
        self._allow(10**9)


def descendants(pid: int) -> set:
    """Pids of every live process below `pid` (Linux /proc)."""
    children: dict = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
