"""Name -> model builder, so configs and flows choose an architecture by a string.

A builder both constructs and initialises its model: the initialisation is part of what a
pruning paper specifies (lottery-ticket rewinding and saliency scores at init depend on it),
so it must not be left to torch's per-layer defaults.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

InShape = tuple[int, int, int]
Builder = Callable[[InShape, int], nn.Module]

_BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Register `fn(in_shape, num_classes) -> nn.Module` under `name`; names must be unique."""

    def decorate(fn: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        _BUILDERS[name] = fn
        return fn

    return decorate


def model_names() -> list[str]:
    """Registered names, sorted so listings and parametrised tests are stable."""
    return sorted(_BUILDERS)


def build_model(name: str, in_shape: InShape, num_classes: int, seed: int) -> nn.Module:
    """Build `name` with weights that depend only on `seed`, in float32 and train mode.

    The CPU generator is forked, so the caller's random stream (data order, augmentation) is
    the same whether or not a model was built. Only the CPU generator is seeded:
    `torch.manual_seed` would also reseed the CUDA generators, which `fork_rng(devices=[])`
    does not restore, and builders create their tensors on the CPU anyway.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = _BUILDERS[name](tuple(in_shape), num_classes)
    return model.float().train()
