import os
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.config import CONF_DIR, register_configs
from pipeline.io.h5 import datasets
from tests.tinymodels import tiny_net

REPO = Path(__file__).resolve().parent.parent
register_configs()
torch.set_num_threads(2)


def read_h5(path):
    """({dataset path: array}, {attribute: value}) of a whole HDF5 file."""
    with h5py.File(path, "r") as f:
        return {name: ds[()] for name, ds in datasets(f).items()}, dict(f.attrs)


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
