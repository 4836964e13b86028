"""CIFAR-style VGGs with BatchNorm, as used in pruning-at-init work.

- `vgg11`, `vgg16` (configurations A and D): each conv is 3x3 (padding 1, with bias) + BN +
  ReLU, each of the five stages ends in a 2x2 max-pool; Kaiming normal (fan_in, ReLU) weights,
  zero biases.
- `vgg19` (configuration E) as GraSP's code defines it for CIFAR (alecwangcq/GraSP,
  models/base/vgg.py): bias-free convs (BN follows each), max-pools after the first four stages
  only, so a 32x32 input leaves the features at 2x2, then a 2x2 average pool and one
  Linear(512, C): 20.04M parameters on CIFAR-10 (GraSP's "20.0M"). GraSP's init: Kaiming normal
  with fan_out for convs, N(0, 0.01) for the fc, zero fc bias. SynFlow's vgg19_bn (lottery_vgg)
  is the same net but with conv biases (+5,504 parameters) and Kaiming fan_in everywhere.

`last_pool: false` drops vgg11/16's fifth max-pool: on 32x32 the head then averages a 2x2 map, as
open_lth's cifar_vgg does (`model.bn_init: uniform` and `model.bias_init: torch` give the rest of its
init). BN weight 1 / bias 0 in all. All are chain-shaped. The pools use
`ceil_mode=True` and the head is a global average pool: identical to the references on 32x32
inputs (GraSP's 2x2 average pool sees a 2x2 map), but a 28x28 input survives all five pools
of vgg11/16 (28 -> 14 -> 7 -> 4 -> 2 -> 1) instead of reaching 0.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from pydantic import Field

from pai_core.models.registry import InShape, WidthParams, register

# Configurations A and D as conv widths per stage; every stage ends with a 2x2 max-pool.
_STAGES = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nn.Module):
    def __init__(
        self, stages: tuple[tuple[int, ...], ...], in_shape: InShape, num_classes: int, width: float = 1.0,
        *, bias: bool = True, last_pool: bool = True,
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c, n_conv = in_shape[0], 0
        for stage, widths in enumerate(stages, start=1):
            for channels in widths:
                channels = max(1, round(channels * width))
                n_conv += 1
                layers[f"conv{n_conv}"] = nn.Conv2d(c, channels, 3, padding=1, bias=bias)
                layers[f"bn{n_conv}"] = nn.BatchNorm2d(channels)
                layers[f"relu{n_conv}"] = nn.ReLU()
                c = channels
            if last_pool or stage < len(stages):
                layers[f"pool{stage}"] = nn.MaxPool2d(2, ceil_mode=True)
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.avgpool(self.features(x))))


class VGGParams(WidthParams):
    last_pool: bool = Field(True, description="false: no max-pool after the last stage, so the head averages "
                                              "its 2x2 map on CIFAR (open_lth's cifar_vgg); true: max-pool it")


def _build(name: str, in_shape: InShape, num_classes: int, width: float = 1.0, last_pool: bool = True) -> nn.Module:
    model = VGG(_STAGES[name], in_shape, num_classes, width, last_pool=last_pool)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


@register("vgg11", params=VGGParams, batch_norm=True,
          description="VGG-11 (config A) with BN, global average pool, one fc; Kaiming normal")
def vgg11(in_shape: InShape, num_classes: int, width: float = 1.0, last_pool: bool = True) -> nn.Module:
    return _build("vgg11", in_shape, num_classes, width, last_pool)


@register("vgg16", params=VGGParams, batch_norm=True,
          description="VGG-16 (config D) with BN, global average pool, one fc; Kaiming normal")
def vgg16(in_shape: InShape, num_classes: int, width: float = 1.0, last_pool: bool = True) -> nn.Module:
    return _build("vgg16", in_shape, num_classes, width, last_pool)


@register("vgg19", params=WidthParams, batch_norm=True,
          description="VGG-19 (config E) with BN as GraSP's CIFAR net: bias-free convs, 4 max-pools, avg pool, "
                      "one fc (20.0M); Kaiming fan_out, fc N(0, 0.01)")
def vgg19(in_shape: InShape, num_classes: int, width: float = 1.0) -> nn.Module:
    model = VGG(_STAGES["vgg19"], in_shape, num_classes, width, bias=False, last_pool=False)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model
