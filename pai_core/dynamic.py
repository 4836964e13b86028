"""Dynamic sparse training: SET (Mocanu et al. 2018) and RigL (Evci et al. 2020).

Every `interval` iterations until `end_iter`, each layer drops the fraction f(t) of its
active weights with the smallest magnitude and grows as many among the weights that were
inactive before the drop: at random (SET) or by largest dense-gradient magnitude (RigL).
f(t) = f0/2 · (1 + cos(π t / end)) anneals the churn. Counts per layer never change, so
the sparsity is exact after every update; grown weights start at exactly zero and their
optimizer state (momentum, Adam moments) is reset, so nothing stale pushes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from pai_core.masks import Mask

OPTIMIZER_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq")


@dataclass
class DynamicSparsity:
    method: str  # "set" | "rigl"
    interval: int
    drop_fraction: float
    end_iter: int
    seed: int  # SET's draws at update t come from (seed, t), so a resumed run draws the same
    updates: list[dict[str, float]] = field(default_factory=list)

    def due(self, it: int) -> bool:
        return 0 < it < self.end_iter and it % self.interval == 0

    def fraction(self, it: int) -> float:
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * it / self.end_iter))

    @torch.no_grad()
    def __call__(self, it: int, model: nn.Module, opt: torch.optim.Optimizer, mask: Mask) -> Mask:
        """Called after backward (dense gradients present), before the masked step."""
        params, f, new, moved = dict(model.named_parameters()), self.fraction(it), {}, 0
        for name, m in mask.items():
            p = params[name]
            was = m.reshape(-1).to(p.device)
            active, candidates = was.nonzero().squeeze(1), (~was).nonzero().squeeze(1)
            k = min(int(f * active.numel()), candidates.numel())
            if k == 0:
                new[name] = m
                continue
            w = p.view(-1)
            drop = active[torch.sort(w[active].abs(), stable=True).indices[:k]]
            if self.method == "rigl":
                grow = candidates[torch.sort(p.grad.view(-1)[candidates].abs(), descending=True, stable=True).indices[:k]]
            else:
                gen = torch.Generator().manual_seed((self.seed * 1_000_003 + it) % 2**63)
                grow = candidates[torch.randperm(candidates.numel(), generator=gen)[:k].to(p.device)]
            now = was.clone()
            now[drop], now[grow] = False, True
            w[grow] = 0.0
            for key in OPTIMIZER_STATE:
                buf = opt.state.get(p, {}).get(key)
                if buf is not None:
                    buf.view(-1)[grow] = 0.0
            new[name] = now.reshape(m.shape).cpu()
            moved += k
        self.updates.append({"iteration": it, "fraction": f, "moved": moved})
        return new
