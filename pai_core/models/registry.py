"""Name -> model builder plus what specs need to know about it, so configs choose an
architecture by a string and every fact about a model lives at its registration.

A builder both constructs and initialises its model: the initialisation is part of what a
pruning paper specifies (lottery-ticket rewinding and saliency scores at init depend on it),
so it must not be left to torch's per-layer defaults. A model's own parameters (a width
multiplier, batch norm on or off) are a pydantic model, so `model.width: 2` is validated,
and refused by name for a model that has no width.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

InShape = tuple[int, int, int]
Builder = Callable[..., nn.Module]  # (in_shape, num_classes, **params) -> module


class ModelParams(BaseModel):
    """What every model takes: departures from its builder's init that reference codes make
    (open_lth draws BatchNorm weights U(0, 1), keeps PyTorch's default biases and redraws weights
    Kaiming normal with fan_in; LAMP's code keeps PyTorch's default weights). They are applied after the builder, from the same seed, so a
    model's own init stays in one place."""
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    weight_init: Literal["model", "torch", "kaiming_normal"] = Field(
        "model", description="model: the builder's weights (Kaiming normal in most models here); torch: every "
                             "Conv/Linear weight redrawn U(±1/sqrt(fan_in)), PyTorch's default (kaiming_uniform_, "
                             "a = √5); kaiming_normal: redrawn N(0, 2/fan_in) (open_lth's kaiming_normal "
                             "initializer, which replaces torchvision's fan_out init of its ImageNet ResNets)")
    bn_init: Literal["model", "uniform"] = Field(
        "model", description="model: the builder's BatchNorm init (weight 1, bias 0 here); uniform: weights "
                             "U(0, 1), biases 0 (open_lth's batchnorm_init 'uniform')")
    bias_init: Literal["model", "torch"] = Field(
        "model", description="model: the builder's biases (zero in most models here); torch: every Conv/Linear "
                             "bias redrawn U(±1/sqrt(fan_in)), PyTorch's default, which open_lth keeps")


INIT_FIELDS = tuple(ModelParams.model_fields)


class WidthParams(ModelParams):
    width: float = Field(1.0, gt=0, le=16, description="multiplies every hidden layer's units/channels")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Builder
    description: str
    Params: type[BaseModel] = ModelParams
    batch_norm: bool | str = False  # True, or the name of the boolean param that turns BN on

    def has_batch_norm(self, params: dict[str, Any]) -> bool:
        if isinstance(self.batch_norm, str):
            return bool(self.Params(**params).model_dump().get(self.batch_norm))
        return self.batch_norm

    def construct(self, in_shape: InShape, num_classes: int, params: dict[str, Any]) -> nn.Module:
        """The builder's network with the init options applied (draws from the current generator)."""
        kwargs = self.Params(**params).model_dump()
        init = {name: kwargs.pop(name) for name in INIT_FIELDS}
        model = self.builder(tuple(in_shape), num_classes, **kwargs)
        apply_init_options(model, **init)
        return model

    def input_problem(self, in_shape: InShape, num_classes: int, params: dict[str, Any]) -> str | None:
        """Why this model cannot take `in_shape`, or None. Built on the meta device: no memory, no time."""
        try:
            with torch.device("meta"):
                self.construct(in_shape, num_classes, params)
        except ValueError as e:
            return str(e)
        return None


_MODELS: dict[str, ModelInfo] = {}


def register(name: str, *, description: str, params: type[BaseModel] = ModelParams,
             batch_norm: bool | str = False) -> Callable[[Builder], Builder]:
    """Register `fn(in_shape, num_classes, **params) -> nn.Module` under `name` (unique)."""

    def decorate(fn: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = ModelInfo(name, fn, description, params, batch_norm)
        return fn

    return decorate


def model_names() -> list[str]:
    """Registered names, sorted so listings and parametrised tests are stable."""
    return sorted(_MODELS)


def model_info(name: str) -> ModelInfo:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(model_names())}")
    return _MODELS[name]


def build_model(name: str, in_shape: InShape, num_classes: int, seed: int, **params: Any) -> nn.Module:
    """Build `name` with weights that depend only on `seed`, in float32 and train mode.

    The CPU generator is forked, so the caller's random stream (data order, augmentation) is
    the same whether or not a model was built. Only the CPU generator is seeded:
    `torch.manual_seed` would also reseed the CUDA generators, which `fork_rng(devices=[])`
    does not restore, and builders create their tensors on the CPU anyway.
    """
    info = model_info(name)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = info.construct(in_shape, num_classes, params)
    return model.float().train()


@torch.no_grad()
def apply_init_options(model: nn.Module, bn_init: str = "model", bias_init: str = "model",
                       weight_init: str = "model") -> None:
    """`ModelParams`' departures from the builder's init, in module order: biases first, then
    BatchNorm weights, then Conv/Linear weights (drawn last, so adding the option left the other two
    draws as they were). Nothing is drawn for "model", so a model without options keeps its weights."""
    if bias_init == "torch":
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and m.bias is not None:
                bound = 1.0 / math.sqrt(m.weight[0].numel()) if m.weight[0].numel() else 0.0
                nn.init.uniform_(m.bias, -bound, bound)
    if bn_init == "uniform":
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and m.affine:
                nn.init.uniform_(m.weight, 0.0, 1.0)
                nn.init.zeros_(m.bias)
    if weight_init != "model":
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                if weight_init == "torch":
                    nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                else:  # kaiming_normal: fan_in, ReLU gain
                    nn.init.kaiming_normal_(m.weight)
