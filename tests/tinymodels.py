"""Tiny models built in code for exact checks (importable as "tests.tinymodels:Class")."""
import os
import time
from pathlib import Path

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv-bn-relu(inplace) -> conv-relu(inplace) -> pool -> fc; layers conv1 ... fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.boom = Boom()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)
        with torch.no_grad():  # non-trivial BN statistics so "buffers unchanged" means something
            self.bn1.running_mean.uniform_(-0.1, 0.1)
            self.bn1.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.boom(self.relu2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


class Boom(nn.Module):
    """Identity, or raises when armed: a model that fails mid-forward."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("boom")
        return x


class CountForwards(nn.Module):
    """Wraps a model and records the batch size of every forward."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.sizes = net, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.net(x)


class GateNet(TinyNet):
    """TinyNet whose forward passes are rationed by a test (tests.conftest.Gate), so a test can stop
    a run part-way at a point it chooses, whatever the machine's speed: with the environment
    variable PIPELINE_TEST_GATE naming a folder, the n-th forward waits until the file `allowed`
    there holds a number >= n, then records n in `used`. Without the variable it is TinyNet."""

    def forward(self, x):
        folder = os.environ.get("PIPELINE_TEST_GATE")
        if folder:
            self.calls = getattr(self, "calls", 0) + 1
            while _read_int(Path(folder) / "allowed") < self.calls:
                time.sleep(0.005)
            _write_int(Path(folder) / "used", self.calls)
        return super().forward(x)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


def _write_int(path: Path, value: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(str(value))
    os.replace(tmp, path)


def tiny_net(seed: int = 0, num_classes: int = 10) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(num_classes).eval()


class TinyNet3D(nn.Module):
    """A tiny 3D CNN for clips [N, 3, T, H, W]: conv3d-relu(inplace) -> conv3d(stride 1,2,2)-relu -> pool -> fc."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(4, 8, 3, stride=(1, 2, 2), padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


class BrightSpot(nn.Module):
    """Channel 0 of `conv2` measures brightness: conv1 (5x5, stride 2) and conv2 (3x3, stride 2)
    average the image there (receptive field 9 px, jump 4), so it fires where a bright square
    is; the other channels are random. Layers conv1, relu1, conv2, relu2, pool, fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 5, stride=2, padding=2)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)
        with torch.no_grad():
            self.conv1.weight[0] = 1.0 / 75
            self.conv1.bias[0] = 0.0
            self.conv2.weight[0] = 0.0
            self.conv2.weight[0, 0] = 1.0 / 9
            self.conv2.bias[0] = 0.0

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))
