"""Gradual magnitude pruning during training (Zhu & Gupta 2017).

Every `every` iterations between `begin` and `end`, the smallest-magnitude surviving
weights are pruned to the cubic ramp s_t = s_f · (1 − (1 − (t − begin)/(end − begin))³):
fast at first, when the network has redundancy to spare, slow near the target. The last
update lands exactly on `end` and on s_f, then training goes on at that sparsity.
`criterion: lamp` ranks by LAMP's scores of the current weights instead of |w| (the same order
within a layer, LAMP's count per layer): the ramp with a layer-adaptive allocation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pai_core.criteria.lamp import lamp_scores
from pai_core.masks import Mask, sparsity
from pai_core.selection import select


@dataclass
class GradualMagnitude:
    final_sparsity: float
    begin: int
    end: int
    every: int
    scope: str = "global"
    min_density: float = 0.0
    criterion: str = "magnitude"  # or "lamp"
    updates: list[dict[str, float]] = field(default_factory=list)

    def due(self, it: int) -> bool:
        return it == self.end or (self.begin <= it < self.end and (it - self.begin) % self.every == 0)

    def sparsity_at(self, it: int) -> float:
        frac = min(max((it - self.begin) / max(self.end - self.begin, 1), 0.0), 1.0)
        return self.final_sparsity * (1 - (1 - frac) ** 3)

    @torch.no_grad()
    def __call__(self, it: int, model: nn.Module, opt: torch.optim.Optimizer, mask: Mask) -> Mask:
        params = dict(model.named_parameters())
        target = self.sparsity_at(it)
        if target <= 0:
            return mask
        score = lamp_scores if self.criterion == "lamp" else torch.abs
        scores = {n: score(params[n].detach()).cpu() for n in mask}
        new = select(scores, {n: m.cpu() for n, m in mask.items()}, 1 - target, self.scope, self.min_density)
        self.updates.append({"iteration": it, "target": target, "sparsity": sparsity(new)})
        return new
