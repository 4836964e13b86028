"""Uniform random scores: the baseline every criterion has to beat."""
from __future__ import annotations

import torch

from pai_core.criteria.registry import register


@register("random", stochastic=True, description="uniform random scores: the baseline every criterion must beat")
def random_scores(model, mask, inputs, params) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    return {n: torch.rand(named[n].shape, generator=inputs.generator) for n in mask}
