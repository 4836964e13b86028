"""Conv-2, Conv-4 and Conv-6 of Frankle & Carbin (2019), the VGG-like CIFAR nets of the
lottery-ticket paper: pairs of 3x3 convs each followed by a 2x2 max-pool, then fully
connected 256-256-C. No batch norm; Glorot normal weights and zero biases, as in the paper.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from pai_core.models.registry import InShape, register

_WIDTHS = (64, 128, 256)  # one width per pair of convs


class ConvNet(nn.Module):
    def __init__(self, depth: int, in_shape: InShape, num_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(depth):
            width = _WIDTHS[i // 2]
            layers[f"conv{i + 1}"] = nn.Conv2d(c, width, 3, padding=1)
            layers[f"relu{i + 1}"] = nn.ReLU()
            if i % 2 == 1:
                layers[f"pool{i // 2 + 1}"] = nn.MaxPool2d(2)
                h, w = h // 2, w // 2
            c = width
        if h < 1 or w < 1:
            raise ValueError(f"conv{depth} needs inputs of at least {2 ** (depth // 2)} pixels")
        self.features = nn.Sequential(layers)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c * h * w, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.flatten(self.features(x))))
        return self.fc3(self.relu(self.fc2(x)))


def _build(depth: int, in_shape: InShape, num_classes: int) -> nn.Module:
    model = ConvNet(depth, in_shape, num_classes)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return model


for _depth in (2, 4, 6):
    register(f"conv{_depth}")(partial(_build, _depth))
