"""Wide ResNets, WRN-d-k (Zagoruyko & Komodakis 2016), for CIFAR-sized inputs.

A 3x3 conv with 16 filters, three stages of n = (d-4)/6 pre-activation blocks of widths 16k,
32k, 64k (stride 2 entering stages 2 and 3), then BN-ReLU, global average pool and one fc.
A block is BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 plus a shortcut: the identity, or where
the width or stride changes a 1x1 conv (no BN) on the block's pre-activated input, as in the
authors' code (szagoruyko/wide-residual-networks, models/wide-resnet.lua). WRN-28-10: 36.5M
parameters, WRN-16-8: 11.0M (the paper's Table 4 / 5).

Init as that Lua code: bias-free convs drawn Kaiming normal with fan_out (its `MSRinit`,
std = sqrt(2 / (k*k*out_channels))); the fc keeps Torch's default U(+-1/sqrt(fan_in)) weights
(PyTorch's default is the same bound) and a zero bias; BN weight 1, bias 0. The authors'
PyTorch port draws with fan_in instead.
"""
from __future__ import annotations

import torch
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError
from torch import nn

from pai_core.models.registry import InShape, ModelParams, register


class WRNParams(ModelParams):
    depth: int = Field(28, ge=10, le=1000, description="layers, 6n+4 (10, 16, 22, 28, 34, 40, ...)")
    widen: int = Field(10, ge=1, le=32, description="widening factor k: stage widths 16k, 32k, 64k")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout between a block's two convs (the paper: 0.3)")

    @field_validator("depth")
    @classmethod
    def _six_n_plus_4(cls, v: int) -> int:
        if (v - 4) % 6:
            raise PydanticCustomError("depth", "must be 6n+4 (10, 16, 22, 28, 34, 40, ...), got {v}", {"v": v})
        return v


class WideBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.dropout(self.relu(self.bn2(self.conv1(pre)))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, in_shape: InShape, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_shape[0], 16, 3, padding=1, bias=False)
        in_c = 16
        for stage, base in enumerate((16, 32, 64), start=1):
            blocks = []
            for i in range(n):
                blocks.append(WideBlock(in_c, base * widen, 2 if stage > 1 and i == 0 else 1, dropout))
                in_c = base * widen
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(in_c)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(self.flatten(self.avgpool(self.relu(self.bn(x)))))


@register("wrn", params=WRNParams, batch_norm=True,
          description="Zagoruyko & Komodakis' WRN-d-k (depth 6n+4, widen k; default WRN-28-10, 36.5M), "
                      "pre-activation, optional dropout; Kaiming fan_out")
def wrn(in_shape: InShape, num_classes: int, depth: int = 28, widen: int = 10, dropout: float = 0.0) -> nn.Module:
    WRNParams(depth=depth, widen=widen, dropout=dropout)  # a direct call gets the spec's checks
    model = WideResNet(depth, widen, in_shape, num_classes, dropout)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            bound = 1 / m.in_features ** 0.5
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model
