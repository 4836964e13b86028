"""ResNet-20 for CIFAR (He et al. 2016, section 4.2): a 3x3 conv with 16 filters, three
stages of three BasicBlocks (16, 32, 64 filters; stride 2 entering stages 2 and 3), global
average pool, Linear(64, C).

Where a block changes shape its shortcut is a 1x1 conv + BN (option B of the paper), as in
the lottery-ticket code, rather than the paper's parameter-free zero padding (option A).
Kaiming normal (fan_in, ReLU) weights, BN weight 1 / bias 0.
"""
from __future__ import annotations

import torch
from torch import nn

from pai_core.models.registry import InShape, WidthParams, register


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, blocks_per_stage: int, in_shape: InShape, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        w16, w32, w64 = (max(1, round(n * width)) for n in (16, 32, 64))
        self.conv1 = nn.Conv2d(in_shape[0], w16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w16)
        self.relu = nn.ReLU()
        in_c = w16
        for stage, width in enumerate((w16, w32, w64), start=1):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_c, width, stride=2 if stage > 1 and i == 0 else 1))
                in_c = width
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


@register("resnet20", params=WidthParams, batch_norm=True,
          description="He et al.'s CIFAR ResNet-20 (16-32-64, 1x1-conv shortcuts); not chain-shaped")
def resnet20(in_shape: InShape, num_classes: int, width: float = 1.0) -> nn.Module:
    model = ResNetCifar(3, in_shape, num_classes, width)  # depth 6 * 3 + 2 = 20
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model
