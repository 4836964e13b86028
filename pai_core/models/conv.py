"""Conv-2, Conv-4 and Conv-6 of Frankle & Carbin (2019), the VGG-like CIFAR nets of the
lottery-ticket paper: pairs of 3x3 convs each followed by a 2x2 max-pool, then fully
connected 256-256-C. No batch norm; Glorot normal weights and zero biases, as in the paper.
`batch_norm: true` adds BatchNorm after every conv (for channel-level methods that read BN
scales: network slimming, early-bird tickets); `width` scales every layer's units.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from pai_core.models.registry import InShape, WidthParams, register

_WIDTHS = (64, 128, 256)  # one width per pair of convs


class ConvParams(WidthParams):
    batch_norm: bool = False


class ConvNet(nn.Module):
    def __init__(self, depth: int, in_shape: InShape, num_classes: int, width: float = 1.0,
                 batch_norm: bool = False) -> None:
        super().__init__()
        c, h, w = in_shape
        units = lambda n: max(1, round(n * width))  # noqa: E731
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(depth):
            channels = units(_WIDTHS[i // 2])
            layers[f"conv{i + 1}"] = nn.Conv2d(c, channels, 3, padding=1)
            if batch_norm:
                layers[f"bn{i + 1}"] = nn.BatchNorm2d(channels)
            layers[f"relu{i + 1}"] = nn.ReLU()
            if i % 2 == 1:
                layers[f"pool{i // 2 + 1}"] = nn.MaxPool2d(2)
                h, w = h // 2, w // 2
            c = channels
        if h < 1 or w < 1:
            raise ValueError(f"conv{depth} needs inputs of at least {2 ** (depth // 2)} pixels")
        self.features = nn.Sequential(layers)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c * h * w, units(256))
        self.fc2 = nn.Linear(units(256), units(256))
        self.fc3 = nn.Linear(units(256), num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.flatten(self.features(x))))
        return self.fc3(self.relu(self.fc2(x)))


def _build(depth: int, in_shape: InShape, num_classes: int, width: float = 1.0,
           batch_norm: bool = False) -> nn.Module:
    model = ConvNet(depth, in_shape, num_classes, width, batch_norm)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return model


for _depth in (2, 4, 6):
    register(f"conv{_depth}", params=ConvParams, batch_norm="batch_norm",
             description=f"Frankle & Carbin's Conv-{_depth}: {_depth} 3x3 convs, max-pool per pair, "
                         "fc 256-256 (inputs >= {0}x{0}); Glorot normal".format(2 ** (_depth // 2)))(
        partial(_build, _depth))
