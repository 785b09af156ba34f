"""Tiny models built in code for exact checks (importable as "tests.tinymodels:Class")."""
import time

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


class SlowNet(TinyNet):
    """TinyNet that sleeps in every forward, so a test can kill a run part-way."""

    def forward(self, x):
        time.sleep(0.25)
        return super().forward(x)


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
