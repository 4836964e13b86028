"""SNFS, sparse momentum (Dettmers & Zettlemoyer, "Sparse Networks from Scratch: Faster
Training without Losing Performance", 2019).

At the end of every epoch (or every `interval` iterations) until `end_fraction`:
1. each layer prunes r = ⌈p·n⌉ of its n active weights, those of smallest |w|; p is the
   prune rate, cosine-decayed over the whole training from 0.5 to 0.005;
2. the total R = Σ r is regrown across layers in proportion to each layer's mean momentum
   magnitude over its active weights (momentum = the exponentially smoothed gradient);
3. within a layer, the regrown weights are those with the largest momentum magnitude
   among its weights not kept; new weights are zero.
The total count is exact after every update; per-layer counts move with the momentum.

The momentum. The reference (TimDettmers/sparse_learning, `sparselearning/core.py`,
`get_momentum_for_weight`) reads the optimizer: SGD's `momentum_buffer`, or Adam's
exp_avg / (sqrt(exp_avg_sq) + 1e-8). It can, because its loop (`Masking.step`) lets the
optimizer see dense gradients and masks only the weights afterwards, so a zero weight's
buffer still smooths its gradient. Here the loop masks the gradient before the step (so
that momentum and Adam state never revive a pruned weight), and the optimizer's buffers
of inactive weights hold nothing. So this callback keeps its own exponential moving
average of the dense gradient, m ← β·m + (1 − β)·g, for every prunable weight and every
optimizer (SGD or Adam alike): the paper's definition, with β = 0.9 (the paper's SGD
momentum and Adam's β₁). The (1 − β) scale changes neither the per-layer proportions nor
the ranking; Adam's per-weight normalisation of the reference is not applied.

Other reference details:
* p follows `CosineDecay(prune_rate, len(train_loader)·epochs, eta_min=0.005)`, stepped
  every iteration: p(t) = 0.005 + (0.5 − 0.005)/2·(1 + cos(π·t/total)).
* updates after every epoch but the last (`mask.at_end_of_epoch()` while epoch < epochs);
  here in `after_backward` of the first iteration of the next epoch, from the momentum
  up to the end of the epoch (this batch's gradient is folded in after the update), and
  before that step.
* the per-layer budget: the reference rounds shares up, caps a layer at 99 % of its free
  positions and smooths the shortfall over later updates (`adjusted_growth`), so its total
  drifts; here largest remainders with each layer capped at its free positions (the
  just-pruned included), so the total is exact. The reference's lower prune rate for
  nearly dense layers (sparsity < 0.2) is not applied: every layer here is sparse.
* a just-pruned weight may be regrown (it is "not kept"); it keeps its value, as in the
  reference, which applies the mask only after both steps. New weights are zero and get
  fresh optimizer state. A layer is never pruned to zero (at most n − 1).

The moving averages are part of the callback's state, so a resumed run updates exactly
as an uninterrupted one. Nothing is drawn at random.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from pai_core.dynamic_methods.registry import MethodParams, register
from pai_core.dynamic_methods.tools import apportion, fresh_state
from pai_core.masks import Mask
from pai_core.training import Callback, TrainState


class SNFSParams(MethodParams):
    prune_rate: float = Field(0.5, gt=0, lt=1, description="p at the start: fraction of each layer's active weights "
                                                            "pruned per update, cosine-decayed")
    final_prune_rate: float = Field(0.005, ge=0, lt=1, description="p at the end of training (the cosine's floor)")
    momentum: float = Field(0.9, ge=0, lt=1, description="β of the dense gradient's moving average")
    interval: int | None = Field(None, gt=0, le=10**8, description="iterations between updates; empty = at the end "
                                                                   "of every epoch (the paper)")
    end_fraction: float = Field(1.0, gt=0, le=1, description="no update after this fraction of training")

    def schedule_problem(self, total: int, iterations_per_epoch: int) -> str | None:
        end, every = int(self.end_fraction * total), self.interval or iterations_per_epoch
        if every >= end:
            field = "interval" if self.interval else "end_fraction"
            return (f"params.{field}: no mask update would happen: updates every {every:,} iterations stop at "
                    f"iteration {end:,} (end_fraction {self.end_fraction:g} of {total:,}); allowed: an interval "
                    f"below {max(end, 1):,}")
        return None

    def rate(self, it: int, total: int) -> float:
        lo, hi = self.final_prune_rate, self.prune_rate
        return lo + (hi - lo) / 2 * (1 + math.cos(math.pi * it / total))


class SNFS(Callback):
    """Sparse momentum as a training callback; the gradient's moving averages live in its state."""

    def __init__(self, params: SNFSParams, total: int):
        self.p, self.total = params, total
        self.end_iter = int(params.end_fraction * total)
        self.momentum: dict[str, torch.Tensor] | None = None
        self.updates: list[dict[str, float]] = []

    def due(self, it: int, iterations_per_epoch: int) -> bool:
        return 0 < it < self.end_iter and it % (self.p.interval or iterations_per_epoch) == 0

    @torch.no_grad()
    def after_backward(self, state: TrainState) -> None:
        if state.it >= self.end_iter:
            return
        params = dict(state.model.named_parameters())
        if self.momentum is None:
            self.momentum = {n: torch.zeros_like(params[n], memory_format=torch.preserve_format) for n in state.mask}
        if self.due(state.it, state.iterations_per_epoch):
            state.mask = self.update(state.it, state.model, state.opt, state.mask)
        beta = self.p.momentum
        for name, m in self.momentum.items():
            g = params[name].grad
            if g is not None:  # dense here: the enforcer masks it only after the callbacks
                m.mul_(beta).add_(g, alpha=1 - beta)

    @torch.no_grad()
    def update(self, it: int, model: torch.nn.Module, opt: torch.optim.Optimizer, mask: Mask) -> Mask:
        params, names, rate = dict(model.named_parameters()), list(mask), self.p.rate(it, self.total)
        kept, dropped, shares, caps = {}, {}, [], []
        for name in names:
            m = mask[name]
            w, mom = params[name].detach().abs().cpu(), self.momentum[name].abs().cpu()
            active = m.reshape(-1).nonzero().squeeze(1)
            n = active.numel()
            r = min(math.ceil(round(rate * n, 9)), max(n - 1, 0))  # round: 0.3·10 is 3, not 3.0000000000000004
            drop = active[torch.sort(w.reshape(-1)[active], stable=True).indices[:r]]
            keep = m.clone().reshape(-1)
            keep[drop] = False
            kept[name], dropped[name] = keep.view(m.shape), drop
            shares.append(mom.reshape(-1)[active].mean().item() if n else 0.0)
            caps.append(m.numel() - (n - r))
        total = sum(d.numel() for d in dropped.values())
        grow = apportion(total, shares, caps)
        new, regrown = {}, 0
        for name, g in zip(names, grow):
            m, keep = mask[name], kept[name]
            mom = self.momentum[name].abs().cpu().reshape(-1)
            free = (~keep).reshape(-1).nonzero().squeeze(1)
            picked = free[torch.sort(mom[free], descending=True, stable=True).indices[:g]]
            now = keep.clone().reshape(-1)
            now[picked] = True
            now = now.view(m.shape)
            w = params[name]
            w[(m & ~now).to(w.device)] = 0  # dropped for good
            born = now & ~m  # a regrown just-dropped weight keeps its value and state
            w[born.to(w.device)] = 0
            fresh_state(opt, w, born)
            new[name] = now
            regrown += int((now & m & ~keep).sum())
        self.updates.append({"iteration": it, "prune_rate": rate, "moved": total, "regrown": regrown})
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"momentum": None if self.momentum is None else {k: v.clone() for k, v in self.momentum.items()},
                "updates": list(self.updates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mom = state.get("momentum")
        self.momentum = None if mom is None else {k: v.clone() for k, v in mom.items()}
        self.updates[:] = state.get("updates", [])

    def record(self) -> dict[str, Any]:
        return {"mask_updates": self.updates}


@register("snfs", label="SNFS", params=SNFSParams,
          description="Dettmers & Zettlemoyer 2019 (sparse momentum): prune the smallest, regrow where the smoothed "
                      "gradient is largest, layer budgets by mean momentum")
def build(d: dict[str, Any], total: int, seed: int) -> SNFS:
    return SNFS(SNFSParams.model_validate(d["params"]), total)
