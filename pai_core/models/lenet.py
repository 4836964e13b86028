"""LeNet models of the pruning literature, on any (C, H, W) input.

- `lenet_300_100`: the fully connected net of Frankle & Carbin (2019), Glorot normal init.
- `lenet5`: the Caffe LeNet-5 used by SNIP (Lee et al. 2019), Xavier uniform init. It has no
  activation after its convolutions, as in Caffe's lenet prototxt.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pai_core.models.registry import InShape, WidthParams, register


def _units(n: int, width: float) -> int:
    return max(1, round(n * width))


def _init(model: nn.Module, weight_init) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            weight_init(m.weight)
            nn.init.zeros_(m.bias)
    return model


class LeNet300100(nn.Module):
    def __init__(self, in_shape: InShape, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        h1, h2 = _units(300, width), _units(100, width)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(math.prod(in_shape), h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.flatten(x)))
        return self.fc3(self.relu(self.fc2(x)))


class LeNet5Caffe(nn.Module):
    def __init__(self, in_shape: InShape, num_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        h, w = (((s - 4) // 2 - 4) // 2 for s in (h, w))  # two (5x5 valid conv, 2x2 pool)
        if h < 1 or w < 1:
            raise ValueError(f"lenet5 needs inputs of at least 16x16, got {in_shape}")
        self.conv1 = nn.Conv2d(c, 20, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * h * w, 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.pool2(self.conv2(self.pool1(self.conv1(x)))))
        return self.fc2(self.relu(self.fc1(x)))


@register("lenet_300_100", params=WidthParams,
          description="Frankle & Carbin's fully connected 300-100 net (any input, flattened); Glorot normal")
def lenet_300_100(in_shape: InShape, num_classes: int, width: float = 1.0) -> nn.Module:
    return _init(LeNet300100(in_shape, num_classes, width), nn.init.xavier_normal_)


@register("lenet5",
          description="Caffe LeNet-5 as in SNIP: 2 valid 5x5 convs, 500-unit fc (inputs >= 16x16); Xavier uniform")
def lenet5(in_shape: InShape, num_classes: int) -> nn.Module:
    return _init(LeNet5Caffe(in_shape, num_classes), nn.init.xavier_uniform_)
