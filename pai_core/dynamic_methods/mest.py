"""MEST, memory-economic sparse training (Yuan, Ma, Niu, Li, Kong, Liu, Gong, Zhan, He, Jin et
al., "MEST: Accurate and Fast Memory-Economic Sparse Training Framework on the Edge", NeurIPS 2021).

Each layer keeps n, its own count in the initial mask (random ERK in the configs). Every ΔT
iterations from iteration 0 (ΔT = round(`interval_fraction` · T), updates at 0, ΔT, 2ΔT, ... < T),
each layer mutates:
* drop: the live weights of lowest salience s = |w| + λ·|∂L/∂w| (this batch's gradient at the
  live weights, so no dense gradient is needed), ties to the lower index;
* grow: positions drawn uniformly at random among all those not kept (a just-dropped one
  included), at zero, with fresh optimizer state (momentum, Adam moments).
Elastic Mutation (EM): the mutation ratio r is piecewise constant, `mutation_ratios[j]` from the
j-th decay point (`decay_fractions[j-1]` of training; 0 for j = 0) to the next, and a layer moves
k = ⌊r·n⌋ weights.

Variants (`variant`), the layer's live count at each moment:
* `em`: drop k, then grow k. n − k for an instant inside the update, exactly n between updates,
  so the density is the spec's throughout (the paper's MEST+EM).
* `em_s`, soft memory bound (MEST+EM&S): grow first, prune later. An update drops the layer back
  to n, by salience, among all its live weights including those grown at the previous update
  (which have trained for ΔT since, and now compete with the others), then grows k = ⌊r·n⌋ (at
  most its free positions). Between updates the layer holds n + k, its density above the target
  by r of its own: 88 % sparsity for a 90 % target at r = 20 % of 10 %. The first update
  (iteration 0) only grows. The first update at or after the last decay point (ratio 0, required)
  drops back to n and grows none: from then on every layer holds exactly n, the spec's density,
  to the end. A schedule with no update there is refused.

Defaults, and where the paper (its README's summary) and the authors' code differ
(boone891214/MEST: `main_sparse_train.py`, `prune_utils/retrain.py` `SparseTraining.update_mask`,
`prune_utils/utils_pr.py` `weight_pruning` / `weight_growing`, `scripts/resnet32/EM*/...irr...sh`):
* r = (0.2, 0.1, 0) of the layer's n. The README's 2 % → 1 % → 0 % (LOWER_BOUND 0.92-0.91-0.9 at a
  90 % target) and the 95 % EM script's 1 % → 0.5 % → 0 % (0.96-0.955-0.95) are fractions of all
  the layer's weights; both are 20 % → 10 % → 0 of its live weights, so one default serves every
  sparsity. The README's EM&S example (UPPER_BOUND 0.88-0.89-0.9) is the same ratio; the EM&S
  scripts grow more (0.85-0.875-0.9: `mutation_ratios: [0.5, 0.25, 0]` here).
* decay points (0.5625, 0.75): MASK_UPDATE_DECAY_EPOCH 90-120 of 160 epochs; ΔT = 1/32 of
  training: SP_MASK_UPDATE_FREQ 5 epochs of 160. The code mutates at the start of epoch 0, 5, ...
  (before any training at epoch 0), as here from iteration 0.
* λ = 0.5 (`lam`). The paper's salience has the gradient term, so a weight grown at zero is not
  dropped for its magnitude alone while its gradient is large. The MEST code defaults `--sp-lmd`
  to 0, no script sets it, and its update runs after `optimizer.zero_grad()`, so its gradient term
  is zero: magnitude alone, `lam: 0` here. 0.5 is `--sp-lmd`'s default in the same group's later
  code built on this one (SparCL, NeurIPS 2022); the README gives no value.
* counts: the code prunes to a sparsity by a percentile of the whole tensor (ties may keep
  fewer) and grows int(zeros − upper·numel); here exact integers, ⌊r·n⌋ per layer.
* growth at zero: `--sp-update-init-method zero`, its only implemented init. A weight dropped and
  regrown in one update restarts at zero, as in the code (it zeroes the pruned weights before
  growing). The code leaves the optimizer state alone; here grown weights get fresh state, as
  RigL's `reset_momentum`, so a revived weight carries no momentum from before it died.
* per layer (the code's `prune_ratios` per layer, `--sp-global-magnitude` off in every script).
  The code's scripts give every layer the same sparsity; from an ERK mask a nearly dense layer
  (LeNet-300-100's output layer at 95 %: 919 of 1000) has few free positions, so most of what
  em drops there comes back at once, at zero, and em_s grows it at most to dense.
* order: the code mutates before an epoch's first batch; here in `after_backward` of that
  iteration, before its (masked) step, which is taken: grown weights receive this batch's
  gradient, as the code's next forward/backward on the new mask gives them theirs.

Draws at update t come from a generator seeded by (seed, t), and the per-layer targets are part
of the callback's state, so a resumed run updates exactly as an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from pai_core.dynamic_methods.registry import MethodParams, register
from pai_core.dynamic_methods.tools import fresh_state, generator, sample_inactive
from pai_core.masks import Mask
from pai_core.training import Callback, TrainState

Ratio = Annotated[float, Field(ge=0, lt=1)]
Point = Annotated[float, Field(gt=0, lt=1)]


class MESTParams(MethodParams):
    variant: Literal["em", "em_s"] = Field(
        "em", description="em: drop then grow, exact density throughout; em_s (soft memory bound): grow now, prune "
                          "back at the next update, so the density is above the target between updates until the "
                          "last decay point")
    mutation_ratios: tuple[Ratio, ...] = Field(
        (0.2, 0.1, 0.0), min_length=1, max_length=100,
        description="r per phase: fraction of each layer's target count moved per update, before the first decay "
                    "point and after each (the README's 2 % -> 1 % -> 0 % of a 90 %-sparse layer)")
    decay_fractions: tuple[Point, ...] = Field(
        (0.5625, 0.75), max_length=99, description="where r steps down, as fractions of training (epochs 90 and 120 "
                                                   "of 160)")
    interval_fraction: float = Field(0.03125, gt=0, lt=1, description="ΔT as a fraction of training (5 of 160 "
                                                                      "epochs); updates at 0, ΔT, 2ΔT, ...")
    lam: float = Field(0.5, ge=0, le=1e6, description="λ of the drop salience |w| + λ|gradient|; 0 = magnitude alone "
                                                      "(the authors' code)")

    def interval(self, total: int) -> int:
        """ΔT in iterations."""
        return max(1, round(self.interval_fraction * total))

    def decay_iterations(self, total: int) -> list[int]:
        return [int(f * total) for f in self.decay_fractions]

    def ratio_at(self, it: int, total: int) -> float:
        """r at iteration `it`: the ratio of the phase it falls in (a decay point starts its phase)."""
        return self.mutation_ratios[sum(d <= it for d in self.decay_iterations(total))]

    def _first_update_from(self, it: int, total: int) -> int:
        every = self.interval(total)
        return -(-it // every) * every

    def schedule_problem(self, total: int, iterations_per_epoch: int) -> str | None:
        ratios, points = self.mutation_ratios, self.decay_fractions
        if len(ratios) != len(points) + 1:
            return (f"params.mutation_ratios: {len(ratios)} ratios for {len(points)} decay points; allowed: one more "
                    f"ratio than decay_fractions (one before the first decay point and one after each)")
        if any(b <= a for a, b in zip(points, points[1:])):
            return (f"params.decay_fractions: must increase (got {', '.join(f'{p:g}' for p in points)}); allowed: "
                    f"strictly increasing fractions in (0, 1)")
        bounds = [0, *self.decay_iterations(total), total]
        if not any(r > 0 and self._first_update_from(bounds[j], total) < min(bounds[j + 1], total)
                   for j, r in enumerate(ratios)):
            return (f"params.mutation_ratios: no mask update would happen: no update every {self.interval(total):,} "
                    f"of {total:,} iterations falls in a phase with a ratio above 0; allowed: a ratio above 0 in a "
                    f"phase that holds an update")
        if self.variant == "em_s":
            if ratios[-1] != 0:
                return (f"params.mutation_ratios: em_s would end above the target density: its last ratio is "
                        f"{ratios[-1]:g}; allowed: a last ratio of 0")
            back = self._first_update_from(bounds[-2], total)
            if back >= total:
                last = (total - 1) // self.interval(total) * self.interval(total)
                return (f"params.decay_fractions: em_s returns to the target density at the first update at or after "
                        f"the last decay point (iteration {bounds[-2]:,}), and the last update is at {last:,} (every "
                        f"{self.interval(total):,} of {total:,}); allowed: a last decay fraction up to "
                        f"{last / total:.6g}")
        return None


def drop_lowest(salience: torch.Tensor, live: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k live weights of lowest salience (flat CPU tensors), ties to the lower index."""
    idx = live.nonzero().squeeze(1)
    return idx[torch.sort(salience[idx], stable=True).indices[:k]]


class MEST(Callback):
    """MEST as a training callback: after backward (dense gradients), before the masked step."""

    def __init__(self, params: MESTParams, total: int, seed: int):
        problem = params.schedule_problem(total, 1)
        if problem:
            raise ValueError(problem)
        self.p, self.total, self.seed = params, total, seed
        self.every = params.interval(total)
        self.targets: dict[str, int] | None = None  # n per layer: the initial mask's counts
        self.updates: list[dict[str, float]] = []

    def on_start(self, state: TrainState) -> None:
        if self.targets is None and state.mask is not None:  # a resumed run has them from its checkpoint
            self.targets = {n: int(m.sum()) for n, m in state.mask.items()}

    def due(self, it: int) -> bool:
        return it < self.total and it % self.every == 0

    def after_backward(self, state: TrainState) -> None:
        if self.due(state.it):
            new = self.update(state.it, state.model, state.opt, state.mask)
            if new is not None:
                state.mask = new

    def counts(self, r: float, n: int, live: int, size: int) -> tuple[int, int]:
        """(dropped, grown) for a layer of target n holding `live` of `size` at ratio r."""
        k = math.floor(round(r * n, 9))  # round: 0.29·100 is 29, not 28.999999999999996
        if self.p.variant == "em":
            return min(k, live), k
        return max(live - n, 0), min(k, size - n)

    @torch.no_grad()
    def update(self, it: int, model: torch.nn.Module, opt: torch.optim.Optimizer, mask: Mask) -> Mask | None:
        """One mutation of every layer; a new tensor for each layer that changes, the same one for
        the others. None (and nothing logged) when no layer changes."""
        if self.targets is None:
            self.targets = {n: int(m.sum()) for n, m in mask.items()}
        params, r, gen = dict(model.named_parameters()), self.p.ratio_at(it, self.total), generator(self.seed, it)
        new, changed, pruned, grown, regrown = {}, False, 0, 0, 0
        for name, m in mask.items():
            w, flat = params[name], m.detach().cpu().bool().reshape(-1)
            n_drop, n_grow = self.counts(r, self.targets[name], int(flat.sum()), flat.numel())
            if not n_drop and not n_grow:
                new[name] = m
                continue
            kept = flat.clone()
            if n_drop:
                salience = w.detach().abs().float().cpu().reshape(-1)
                if self.p.lam and w.grad is not None:
                    salience = salience + self.p.lam * w.grad.detach().abs().float().cpu().reshape(-1)
                kept[drop_lowest(salience, flat, n_drop)] = False
            now = kept.clone()
            now[sample_inactive(kept, n_grow, gen, free=flat.numel() - int(kept.sum()))] = True
            now = now.view(m.shape)
            born = now & ~kept.view(m.shape)  # every grown weight, a just-dropped one included, starts at zero
            w[(~now).to(w.device)] = 0
            w[born.to(w.device)] = 0
            fresh_state(opt, w, born)
            new[name], changed = now, True
            pruned, grown, regrown = pruned + n_drop, grown + n_grow, regrown + int((born & m.cpu().bool()).sum())
        if not changed:
            return None
        kept_all = sum(int(v.sum()) for v in new.values())
        self.updates.append({"iteration": it, "ratio": r, "pruned": pruned, "grown": grown, "regrown": regrown,
                             "density": kept_all / sum(v.numel() for v in new.values())})
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"targets": None if self.targets is None else dict(self.targets), "updates": list(self.updates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        targets = state.get("targets")
        self.targets = None if targets is None else {k: int(v) for k, v in targets.items()}
        self.updates[:] = state.get("updates", [])

    def record(self) -> dict[str, Any]:
        return {"mask_updates": self.updates}


@register("mest", label="MEST", params=MESTParams,
          description="Yuan et al. 2021: per layer, drop the lowest |w| + lam|gradient| and grow as many at random "
                      "(zero-init), the mutation ratio stepping down over training (elastic mutation); variant em_s "
                      "grows first and prunes back at the next update (soft memory bound)")
def build(d: dict[str, Any], total: int, seed: int) -> MEST:
    return MEST(MESTParams.model_validate(d["params"]), total, seed)
