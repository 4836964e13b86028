"""MobileNetV2 (Sandler et al., CVPR 2018) exactly as torchvision defines and initialises it
(`torchvision.models.mobilenet_v2(weights=None, num_classes=C, width_mult=w)`; weights are
never downloaded): 3,504,872 parameters at 1000 classes. Inverted residual blocks: a 1x1
expansion, a 3x3 *depthwise* conv, a 1x1 linear projection, and a residual add where the shape
allows. It is the standard target of channel pruning for real speed (AMC, NetAdapt,
MetaPruning): channel_graph ties each depthwise filter to its input channel, so structure
filter removes an expansion channel together with its depthwise filter.

The stem and four stages downsample 32x, as on ImageNet (inputs of at least 17x17, as
resnet18/50); an input with other than 3 channels gets a stem conv of its own width,
initialised as torchvision's (Kaiming normal, fan_out).
"""
from __future__ import annotations

from pydantic import Field
from torch import nn

from pai_core.models.registry import InShape, ModelParams, register
from pai_core.models.resnet_imagenet import MIN_SIDE


class MobileNetParams(ModelParams):
    width: float = Field(1.0, gt=0, le=4, description="torchvision's width_mult: every layer's channels")


@register("mobilenet_v2", params=MobileNetParams, batch_norm=True,
          description="torchvision's MobileNetV2 (inverted residuals, depthwise convs; inputs >= 17x17), "
                      "torchvision's init; 3.5M at 1000 classes")
def mobilenet_v2(in_shape: InShape, num_classes: int, width: float = 1.0) -> nn.Module:
    c, h, w = in_shape
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"mobilenet_v2 needs inputs of at least {MIN_SIDE}x{MIN_SIDE}: its stem and stages "
                         f"downsample 32x, got {in_shape}")
    from torchvision.models import mobilenet_v2 as build  # deferred: importing torchvision costs ~2 s

    model = build(weights=None, num_classes=num_classes, width_mult=width)
    if c != 3:
        stem = model.features[0][0]
        model.features[0][0] = nn.Conv2d(c, stem.out_channels, 3, stride=2, padding=1, bias=False)
        nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model
