"""He et al. (2016)'s CIFAR ResNets, section 4.2: 6n+2 layers. A 3x3 conv with 16 filters,
three stages of n BasicBlocks (16, 32, 64 filters; stride 2 entering stages 2 and 3), global
average pool, Linear(64, C). Registered: resnet20 (n=3), resnet32 (5), resnet56 (9), resnet110 (18).

Where a block changes shape, its shortcut is one of the paper's two options (`shortcut`):
- `A`: parameter-free: the input subsampled by the stride, its channels zero-padded up to the
  block's width. What the paper's CIFAR nets use (Table 6: ResNet-32 0.46M, ResNet-56 0.85M,
  ResNet-110 1.7M parameters), and the default of resnet32/56/110.
- `B`: a strided 1x1 conv + BN. The default of resnet20, as in the lottery-ticket code (open_lth),
  whose keys and weights stay as they were. SynFlow's lottery_resnet also uses B; GraSP's
  "resnet32" uses B too but with doubled widths (32-64-128, about 1.9M parameters): not this net.

Init: Kaiming normal, fan_in, ReLU gain, for convs and the fc (He et al. 2015's forward case, the
paper's reference [13]); BN weight 1, bias 0. fb.resnet.torch and GraSP draw convs with fan_out.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from pai_core.models.registry import InShape, WidthParams, register

Shortcut = Literal["A", "B"]
_SHORTCUT_HELP = "A: zero-padding identity (no parameters, the paper's CIFAR nets); B: 1x1 conv + BN"


class ParamsA(WidthParams):
    shortcut: Shortcut = Field("A", description=_SHORTCUT_HELP)


class ParamsB(WidthParams):
    shortcut: Shortcut = Field("B", description=_SHORTCUT_HELP)


class ZeroPadShortcut(nn.Module):
    """Option A: keep every `stride`-th pixel (a 1x1 stride-s identity) and append zero channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"a zero-padding shortcut cannot shrink {in_channels} to {out_channels} channels")
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, zero_channels={self.extra}"


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: Shortcut = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride) if shortcut == "A" else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, blocks_per_stage: int, in_shape: InShape, num_classes: int, width: float = 1.0,
                 shortcut: Shortcut = "B") -> None:
        super().__init__()
        w16, w32, w64 = (max(1, round(n * width)) for n in (16, 32, 64))
        self.conv1 = nn.Conv2d(in_shape[0], w16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w16)
        self.relu = nn.ReLU()
        in_c = w16
        for stage, width in enumerate((w16, w32, w64), start=1):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_c, width, stride=2 if stage > 1 and i == 0 else 1, shortcut=shortcut))
                in_c = width
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def resnet_cifar(depth: int, in_shape: InShape, num_classes: int, width: float = 1.0,
                 shortcut: Shortcut = "B") -> nn.Module:
    """The initialised depth-`depth` (6n+2) CIFAR ResNet."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"a CIFAR ResNet's depth is 6n+2 (8, 14, 20, ...), got {depth}")
    model = ResNetCifar((depth - 2) // 6, in_shape, num_classes, width, shortcut)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


@register("resnet20", params=ParamsB, batch_norm=True,
          description="He et al.'s CIFAR ResNet-20 (16-32-64; shortcut B: 1x1 conv, as open_lth; A: 0.27M); "
                      "Kaiming fan_in")
def resnet20(in_shape: InShape, num_classes: int, width: float = 1.0, shortcut: Shortcut = "B") -> nn.Module:
    return resnet_cifar(20, in_shape, num_classes, width, shortcut)


def _register(depth: int, paper_count: str) -> None:
    def build(in_shape: InShape, num_classes: int, width: float = 1.0, shortcut: Shortcut = "A") -> nn.Module:
        return resnet_cifar(depth, in_shape, num_classes, width, shortcut)

    register(f"resnet{depth}", params=ParamsA, batch_norm=True,
             description=f"He et al.'s CIFAR ResNet-{depth} (16-32-64; shortcut A: zero padding, {paper_count} "
                         "as the paper; B: 1x1 conv); Kaiming fan_in")(build)


for _depth, _count in ((32, "0.46M"), (56, "0.85M"), (110, "1.7M")):
    _register(_depth, _count)
