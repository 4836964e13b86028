"""GraNet, gradual pruning with zero-cost neuroregeneration (Liu, Chen, Chen, Atashgahi, Yin,
Kou, Shen, Pechenizkiy, Wang & Mocanu, "Sparse Training via Boosting Pruning Plasticity with
Neuroregeneration", NeurIPS 2021).

Training starts from a mask of density d_i (`initial_density`; the spec's criterion and
scope draw it: random ERK in the paper, all ones for d_i = 1, the paper's "s_i = 0"
dense-to-sparse run). Every `interval` iterations from t0 (`start_fraction`) to t_end
(`end_fraction`), and exactly at t_end:
1. gradual magnitude pruning, global across layers, to Zhu & Gupta's cubic schedule
   d_t = d_f + (d_i − d_f)·(1 − (t − t0)/(t_end − t0))³, so the mask keeps exactly
   round(N·d_t) of the N prunable weights, and at t_end round(N·d_f): the spec's final density
   (1 − prune.sparsity). The ramp is `pai_core.gradual.GradualMagnitude`'s (its schedule and
   its update times), and the selection `pai_core.selection.select`'s (ties to the lower index);
2. zero-cost neuroregeneration: each layer drops k = ⌈r_t·n⌉ of its n active weights, those of
   smallest |w|, and regrows k among all its weights not kept, those of largest dense |gradient|
   (RigL's rule), so the density of step 1 is unchanged. r_t is cosine-decayed over the whole
   training from `regrow_fraction` (0.5) to `final_regrow_fraction` (0.005).
A regrown connection that was inactive before step 2 (pruned earlier, or just now by step 1)
starts at zero with fresh optimizer state; one dropped in step 2 and regrown in it keeps its
value and state, as if never dropped. Nothing is drawn at random; the callback's only state is
its log of updates, so a resumed run updates exactly as an uninterrupted one.

Defaults and where paper and reference code (VITA-Group/GraNet, `CIFAR/sparselearning/core.py`
`Masking.step/pruning/truncate_weights`, `CIFAR/main.py`, the README's commands) differ:
* d_i: the code's `--init-density` default 0.5 with ERK (`--sparse-init ERK`), the paper's
  sparse-to-sparse GraNet (s_i = 0.5); `initial_density: 1` is its dense-to-sparse variant.
* ΔT = 1000 iterations (`--update-frequency` in every CIFAR command; ImageNet uses 4000).
* t0 = 0 and t_end = 110 of 160 epochs (`--init-prune-epoch 0`, `--final-prune-epoch` 110, the
  defaults the README's CIFAR commands run with); the repository's scripts use 80 of 160 and its
  ImageNet commands 30 of 100. Here both are fractions of training.
* Pruning is global magnitude (`pruning`: one threshold over all layers). The code keeps |w| >
  the k-th largest, which may keep fewer than k on ties; here exactly round(N·d_t), ties to the
  lower index. `pruning_scope: layerwise` is the code's GraNet_uniform (`pruning_uniform`): every
  layer pruned to d_t by its own magnitudes (round(n·d_t) each, a layer already below keeps what
  it has), except that once d_t falls below `last_layer_floor` (0.2) the classifier stays at that
  density and the other layers go to (N·d_t − floor·n_last)/(N − n_last), so the total is N·d_t
  (the code's "keep the density of the last layer as 0.2"; it finds the classifier by its name,
  here it is the model's last prunable layer, and no floor applies when `prune.ignore` keeps it
  out of the mask). The code pairs it with a uniform initial mask
  (`prune.scope: layerwise` here).
* Regeneration is per layer (`truncate_weights`: `magnitude_death` with ⌈r·n⌉, then
  `gradient_growth`, the same count in the same layer), r from `CosineDecay(0.5, T_max = all
  training iterations, eta_min = 0.005)` stepped every iteration, as here.
* When: the paper performs neuroregeneration after each gradual pruning step, so it stops at
  t_end (`regrow_until: pruning_end`, the default). The code's `Masking.step` keeps the
  prune-and-regrow step every ΔT until the last iteration (`regrow_until: training_end`).
* Order within an iteration: the code runs the optimizer step, then the update with the
  gradient of that step; here the update runs after backward with this batch's dense gradient,
  then the (masked) step: every optimizer step is taken, as in the code, and a regrown weight
  receives this iteration's gradient.
* `regrow_fraction: 0` is the paper's GMP baseline (gradual magnitude pruning, no regeneration).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from pai_core.dynamic_methods.registry import MethodParams, register
from pai_core.dynamic_methods.tools import fresh_state
from pai_core.gradual import GradualMagnitude
from pai_core.masks import Mask, prunable_names
from pai_core.selection import select
from pai_core.training import Callback, TrainState


LAST_LAYER_FLOOR = 0.2  # the code's GraNet_uniform: "keep the density of the last layer as 0.2"


class GraNetParams(MethodParams):
    initial_density: float = Field(0.5, gt=0, le=1, description="density of the mask training starts from (the "
                                                                "spec's criterion and scope draw it); 1 = dense start")
    interval: int = Field(1000, gt=0, le=10**8, description="iterations between updates (ΔT)")
    start_fraction: float = Field(0.0, ge=0, lt=1, description="gradual pruning starts at this fraction of training")
    end_fraction: float = Field(0.6875, gt=0, lt=1, description="the final density is reached at this fraction of "
                                                                "training (110 of 160 epochs)")
    regrow_fraction: float = Field(0.5, ge=0, lt=1, description="r at the start: fraction of each layer's active "
                                                                "weights dropped and regrown, cosine-decayed; "
                                                                "0 = plain gradual magnitude pruning")
    final_regrow_fraction: float = Field(0.005, ge=0, lt=1, description="r at the end of training (the cosine's floor)")
    regrow_until: Literal["pruning_end", "training_end"] = Field(
        "pruning_end", description="pruning_end: regenerate only with each pruning step (the paper); training_end: "
                                   "every interval to the last iteration (the reference code)")
    pruning_scope: Literal["global", "layerwise"] = Field(
        "global", description="global: one magnitude threshold over all layers (GraNet); layerwise: every layer to "
                              "the same density (the code's GraNet_uniform)")
    last_layer_floor: float = Field(LAST_LAYER_FLOOR, ge=0, le=1,
                                    description="layerwise: the last layer's density never goes below this (the "
                                                "code's 0.2 for the classifier); 0 = no floor")
    KEYED_WHEN_SET: ClassVar[frozenset[str]] = frozenset({"pruning_scope", "last_layer_floor"})

    @field_validator("last_layer_floor")
    @classmethod
    def _floor_is_layerwise(cls, v: float, info: ValidationInfo) -> float:
        if v != LAST_LAYER_FLOOR and info.data.get("pruning_scope") != "layerwise":  # a full dump round-trips
            raise ValueError(f"{v:g} applies to pruning_scope layerwise only; allowed: set pruning_scope: layerwise, "
                             "or leave last_layer_floor out")
        return v

    def layer_densities(self, sizes: dict[str, int], density: float,
                        classifier: str | None) -> tuple[float, dict[str, float]]:
        """layerwise: (the density of every layer, {the classifier: its floor} when the floor holds).
        `classifier`: the model's last prunable weight, or None when the mask leaves it out."""
        floor = self.last_layer_floor
        if classifier is None or classifier not in sizes or density >= floor or len(sizes) == 1:
            return density, {}
        last = classifier
        total, n_last = sum(sizes.values()), sizes[last]
        others = (total * density - floor * n_last) / (total - n_last)
        return max(others, 1.0 / (total - n_last)), {last: floor}

    def window(self, total: int) -> tuple[int, int]:
        """The first and last iteration of the gradual pruning."""
        return int(self.start_fraction * total), int(self.end_fraction * total)

    def schedule_problem(self, total: int, iterations_per_epoch: int) -> str | None:
        begin, end = self.window(total)
        if end <= begin:
            return (f"params.end_fraction: the pruning window is empty: it starts at iteration {begin:,} "
                    f"(start_fraction {self.start_fraction:g}) and ends at {end:,} (end_fraction {self.end_fraction:g} "
                    f"of {total:,}); allowed: an end_fraction above start_fraction, at least one iteration later")
        if 0 < self.regrow_fraction < self.final_regrow_fraction:  # regrow_fraction 0: none at all (GMP)
            return (f"params.final_regrow_fraction: {self.final_regrow_fraction:g} is above regrow_fraction "
                    f"{self.regrow_fraction:g} (the cosine decays from it); allowed: 0 to {self.regrow_fraction:g}")
        return None

    def regrow_at(self, it: int, total: int) -> float:
        """r_t: cosine from regrow_fraction at 0 to final_regrow_fraction at the end of training
        (the code's CosineDecay). With regrow_fraction 0 there is no regeneration at all."""
        if self.regrow_fraction == 0:
            return 0.0
        lo, hi = self.final_regrow_fraction, self.regrow_fraction
        return lo + (hi - lo) / 2 * (1 + math.cos(math.pi * it / total))


def neuroregenerate(w_abs: torch.Tensor, g_abs: torch.Tensor, active: torch.Tensor, k: int) -> torch.Tensor:
    """One layer's zero-cost neuroregeneration on flat tensors: drop the k active weights of
    smallest |w|, regrow the k of largest |gradient| among all not kept (the just-dropped
    included); ties to the lower index. Returns the new flat bool mask, with as many as `active`."""
    idx = active.nonzero().squeeze(1)
    drop = idx[torch.sort(w_abs[idx], stable=True).indices[:k]]
    kept = active.clone()
    kept[drop] = False
    free = (~kept).nonzero().squeeze(1)
    grow = free[torch.sort(g_abs[free], descending=True, stable=True).indices[:k]]
    now = kept.clone()
    now[grow] = True
    return now


class GraNet(Callback):
    """GraNet as a training callback: after backward (dense gradients), before the masked step."""

    def __init__(self, params: GraNetParams, total: int, final_density: float):
        if not 0 < final_density <= params.initial_density:
            raise ValueError(f"final density {final_density} must be in (0, initial_density {params.initial_density}]")
        self.p, self.total, self.final = params, total, final_density
        self.begin, self.end = params.window(total)
        # the cubic ramp 0 -> 1 over [begin, end] and its update times, those of gradual PaT
        self.ramp = GradualMagnitude(1.0, self.begin, self.end, params.interval)
        self.updates: list[dict[str, float]] = []

    def due(self, it: int) -> bool:
        if it <= 0 or it < self.begin:  # the first update comes after `interval` steps, as the code's
            return False
        if it <= self.end:
            return self.ramp.due(it)
        return self.p.regrow_until == "training_end" and (it - self.begin) % self.p.interval == 0

    def density_at(self, it: int) -> float:
        """d_t = d_i + (d_f − d_i)·ramp(t): d_i before the window, d_f (exactly) from its end on."""
        if it >= self.end:
            return self.final
        d_i = self.p.initial_density
        return d_i + (self.final - d_i) * self.ramp.sparsity_at(it)

    def after_backward(self, state: TrainState) -> None:
        if self.due(state.it):
            state.mask = self.update(state.it, state.model, state.opt, state.mask)

    @torch.no_grad()
    def update(self, it: int, model: torch.nn.Module, opt: torch.optim.Optimizer, mask: Mask) -> Mask:
        params = dict(model.named_parameters())
        before = {n: m.detach().cpu().bool() for n, m in mask.items()}
        n_all, alive = sum(m.numel() for m in before.values()), sum(int(m.sum()) for m in before.values())
        density = self.density_at(it)
        pruned = before
        if self.p.pruning_scope == "layerwise" or round(n_all * density) < alive:  # 1. magnitude pruning, cubic
            scores = {n: params[n].detach().abs().cpu() for n in before}
            if self.p.pruning_scope == "global":
                pruned = select(scores, before, density, "global")
            else:
                rest, floor = self.p.layer_densities({n: m.numel() for n, m in before.items()}, density,
                                                     prunable_names(model)[-1])
                pruned = select(scores, before, rest, "layerwise", layer_density=floor)
        rate = self.p.regrow_at(it, self.total)
        new, moved, regrown = {}, 0, 0
        for name, m in pruned.items():  # 2. per layer: drop ⌈r·n⌉ smallest, regrow as many by |gradient|
            w, flat = params[name], m.reshape(-1)
            n = int(flat.sum())
            k = math.ceil(round(rate * n, 9))  # round: 0.3·10 is 3, not 3.0000000000000004
            if k:
                g = w.grad.detach().abs().cpu().reshape(-1) if w.grad is not None else torch.zeros(flat.numel())
                now = neuroregenerate(w.detach().abs().cpu().reshape(-1), g, flat, k)
                regrown += int((now & flat).sum()) - (n - k)  # dropped and grown back in the same step
                moved += k
            else:
                now = flat
            now = now.view(m.shape)
            born = now & ~m  # new connections: zero, with no optimizer history
            w[~now.to(w.device)] = 0
            w[born.to(w.device)] = 0
            fresh_state(opt, w, born)
            new[name] = now
        kept = sum(int(m.sum()) for m in new.values())
        self.updates.append({"iteration": it, "density": kept / n_all, "pruned": alive - kept,
                             "regrow_fraction": rate, "moved": moved, "regrown": regrown})
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"updates": list(self.updates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates[:] = state.get("updates", [])

    def record(self) -> dict[str, Any]:
        return {"mask_updates": self.updates}


@register("granet", label="GraNet", params=GraNetParams,
          description="Liu et al. 2021: gradual global magnitude pruning on the cubic schedule from initial_density "
                      "to the final density, each step followed by a prune-and-regrow (by gradient) at constant "
                      "density")
def build(d: dict[str, Any], total: int, seed: int) -> GraNet:
    return GraNet(GraNetParams.model_validate(d["params"]), total, d["final_density"])
