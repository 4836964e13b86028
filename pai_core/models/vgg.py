"""CIFAR-style VGG-11 and VGG-16 (configurations A and D), as used in pruning-at-init work.

Each conv is 3x3 (padding 1) + BatchNorm + ReLU and each stage ends in a 2x2 max-pool;
a global average pool then feeds a single Linear(512, C), so inputs of any size work.
Kaiming normal (fan_in, ReLU) weights, zero biases, BN weight 1 / bias 0.

The max-pools use `ceil_mode=True`: identical to floor mode on 32x32 inputs, but it lets
a 28x28 input survive all five pools (28 -> 14 -> 7 -> 4 -> 2 -> 1) instead of reaching 0.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from pai_core.models.registry import InShape, WidthParams, register

# Configurations A and D as conv widths per stage; every stage ends with a 2x2 max-pool.
_STAGES = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
}


class VGG(nn.Module):
    def __init__(
        self, stages: tuple[tuple[int, ...], ...], in_shape: InShape, num_classes: int, width: float = 1.0
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c, n_conv = in_shape[0], 0
        for stage, widths in enumerate(stages, start=1):
            for channels in widths:
                channels = max(1, round(channels * width))
                n_conv += 1
                layers[f"conv{n_conv}"] = nn.Conv2d(c, channels, 3, padding=1)
                layers[f"bn{n_conv}"] = nn.BatchNorm2d(channels)
                layers[f"relu{n_conv}"] = nn.ReLU()
                c = channels
            layers[f"pool{stage}"] = nn.MaxPool2d(2, ceil_mode=True)
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.avgpool(self.features(x))))


def _build(name: str, in_shape: InShape, num_classes: int, width: float = 1.0) -> nn.Module:
    model = VGG(_STAGES[name], in_shape, num_classes, width)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


@register("vgg11", params=WidthParams, chain=True, batch_norm=True,
          description="VGG-11 (config A) with BN, global average pool, one fc; Kaiming normal")
def vgg11(in_shape: InShape, num_classes: int, width: float = 1.0) -> nn.Module:
    return _build("vgg11", in_shape, num_classes, width)


@register("vgg16", params=WidthParams, chain=True, batch_norm=True,
          description="VGG-16 (config D) with BN, global average pool, one fc; Kaiming normal")
def vgg16(in_shape: InShape, num_classes: int, width: float = 1.0) -> nn.Module:
    return _build("vgg16", in_shape, num_classes, width)
