"""Criteria registry: a pruning criterion is one file and one `@register` line.

A criterion maps a model (weights at k1, masked), its current mask and, if it needs them,
a few data batches to one score tensor per prunable parameter. Higher score = keep.
Its parameters are its own pydantic model, so a spec's `prune.params` is validated
against it before anything runs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from pai_core.masks import Mask

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
ScoreFn = Callable[[nn.Module, Mask, Batches | None, BaseModel, torch.Generator], dict[str, torch.Tensor]]


class NoParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Criterion:
    name: str
    score: ScoreFn
    Params: type[BaseModel] = NoParams
    needs_data: bool = False
    stochastic: bool = False  # draws from the generator, so its key includes the seed


_CRITERIA: dict[str, Criterion] = {}


def register(name: str, *, params: type[BaseModel] = NoParams, needs_data: bool = False,
             stochastic: bool = False) -> Callable[[ScoreFn], ScoreFn]:
    def deco(fn: ScoreFn) -> ScoreFn:
        if name in _CRITERIA:
            raise ValueError(f"criterion {name!r} registered twice")
        _CRITERIA[name] = Criterion(name, fn, params, needs_data, stochastic)
        return fn
    return deco


def criterion_names() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(name: str) -> Criterion:
    try:
        return _CRITERIA[name]
    except KeyError:
        raise ValueError(f"unknown criterion {name!r}; allowed: {', '.join(criterion_names())}") from None
