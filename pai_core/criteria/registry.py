"""Criteria registry: a pruning criterion is one file and one `@register` line.

A criterion maps a model (weights at k1, already masked), its current mask and a
`ScoreInputs` (data batches if it needs them, a seeded generator, the input shape) to one
score tensor per prunable parameter. Higher score = keep: a criterion that prunes the
largest values negates inside its own file. Scoring must not change the model's weights.
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


@dataclass
class ScoreInputs:
    generator: torch.Generator  # seeded from the score stage's key
    in_shape: tuple[int, ...]
    num_classes: int
    batches: Batches | None = None  # train batches in epoch-0 order, if the criterion needs data
    dense_weights: dict[str, torch.Tensor] | None = None  # a `revives` criterion: the weights before masking
    keep: int | None = None  # a `chooses_count` criterion: how many weights the round's mask keeps
    rebuild: Callable[[int], nn.Module] | None = None  # seed -> a fresh init of the same architecture (NTK-SAP)


ScoreFn = Callable[[nn.Module, Mask, ScoreInputs, BaseModel], dict[str, torch.Tensor]]


class NoParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True)
class Criterion:
    name: str
    score: ScoreFn
    Params: type[BaseModel] = NoParams
    needs_data: bool = False
    stochastic: bool = False  # draws from the generator, so its key includes the seed
    bn_mode: str | None = None  # "train" | "eval": BatchNorm mode it scores in (paper's); None: no forward pass
    description: str = ""
    # A pruned weight may come back in a later round at fixed weights: it is scored at its
    # unmasked value (ScoreInputs.dense_weights) and every weight is ranked, not only survivors.
    revives: bool = False
    # Scores whole filters/neurons (every weight of a unit carries the unit's score): only a
    # filter selection (PaT's `structure: filter`) may use it.
    whole_units: bool = False
    # Chooses the set of weights for the round's kept count itself (PHEW's walks stop there);
    # its scores rank that set first, so only a global, floor-free unstructured selection keeps
    # exactly its choice, and its score stage is keyed by the density.
    chooses_count: bool = False
    # Why the criterion cannot score this net (None: it can), asked of the meta-device net
    # while the spec validates, so a refusal comes before any compute.
    model_check: Callable[[nn.Module], str | None] | None = None


_CRITERIA: dict[str, Criterion] = {}


def register(name: str, *, description: str, params: type[BaseModel] = NoParams, needs_data: bool = False,
             stochastic: bool = False, bn_mode: str | None = None, revives: bool = False,
             whole_units: bool = False, chooses_count: bool = False,
             model_check: Callable[[nn.Module], str | None] | None = None) -> Callable[[ScoreFn], ScoreFn]:
    def deco(fn: ScoreFn) -> ScoreFn:
        if name in _CRITERIA:
            raise ValueError(f"criterion {name!r} registered twice")
        _CRITERIA[name] = Criterion(name, fn, params, needs_data, stochastic, bn_mode, description, revives,
                                    whole_units, chooses_count, model_check)
        return fn
    return deco


def criterion_names() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(name: str) -> Criterion:
    try:
        return _CRITERIA[name]
    except KeyError:
        raise ValueError(f"unknown criterion {name!r}; allowed: {', '.join(criterion_names())}") from None
