"""DSR, dynamic sparse reparameterization (Mostafa & Wang, "Parameter efficient training of
deep convolutional neural networks by dynamic sparse reparameterization", ICML 2019).

Every `interval` iterations until `end_fraction` of training:
1. prune every active weight with |w| < H, one threshold H for all layers (K weights);
2. regrow K weights, split across layers in proportion to each layer's surviving
   (non-zero) weights, at random positions of the layer, zero-initialised;
3. adapt H for the next time so that K tracks the target Np: H halves when K > (1 + δ)·Np,
   doubles when K < (1 − δ)·Np.
The total count is exact after every update; the per-layer counts move (that is the
method: parameters go where weights survive).

Which reference each detail follows (IntelAI/dynamic-reparameterization, `main.py` `train`
and `parameterized_tensors.py` `SparseTensor.prune_threshold` / `grow_random`):
* H starts at 1e-3 (`threshold = 1.0e-3`), δ = 0.1 (the 1.1 / 0.9 bounds) and is adapted
  after the regrowth, from this update's K.
* a layer whose every active weight is below H keeps one (the reference keeps the first
  in index order; here the largest |w|, ties to the lower index).
* regrowth never picks a weight pruned in the same update (`np.setdiff1d` with the pruned
  indices), and a layer with too few free positions grows what fits; the rest goes to the
  other layers.
* the split: the reference rounds each layer's share and gives the rounding discrepancy to
  a random layer; here largest remainders (ties to the lower index), deterministic.
* new weights are zero (`reinitialize_unused` to zero; `--big-new-weights` off) and get
  fresh optimizer state (the reference keeps the momentum a masked weight had decayed to).
* defaults: Np = 600 (`--n-prune-params`; the code's default model is the MNIST MLP at
  98 % sparsity, where that is ~11 % of the active weights; the paper's CIFAR-10 WRN-28-2
  and ImageNet ResNet-50 runs use 20,000 and 400,000), interval 100 iterations (the
  WRN-28-2 schedule's first period; it doubles later there, fixed here), rewiring stopped
  after 95 % of training (`--stop-rewire-epoch` 190 of 200 epochs).

The update runs in `after_backward` of its iteration (before that step, like SET/RigL
here; after it in the reference). Random positions at update t come from a generator
seeded by (node key, t); H is part of the callback's state, so a resumed run continues
with the threshold an uninterrupted one would have.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from pai_core.dynamic_methods.registry import MethodParams, register
from pai_core.dynamic_methods.tools import apportion, flat_to_mask, fresh_state, generator, sample_distinct
from pai_core.masks import Mask
from pai_core.training import Callback, TrainState


class DSRParams(MethodParams):
    n_prune: int = Field(600, gt=0, le=10**12, description="Np: weights each reallocation should prune; H adapts "
                                                            "to hit it")
    delta: float = Field(0.1, gt=0, lt=1, description="δ: H halves above Np·(1+δ) pruned, doubles below "
                                                        "Np·(1−δ)")
    threshold: float = Field(1e-3, gt=0, le=1e6, description="H at the first reallocation")
    interval: int = Field(100, gt=0, le=10**8, description="iterations between reallocations")
    end_fraction: float = Field(0.95, gt=0, le=1, description="no reallocation after this fraction of training")

    def schedule_problem(self, total: int, iterations_per_epoch: int) -> str | None:
        end = int(self.end_fraction * total)
        if self.interval >= end:
            return (f"params.interval: no mask update would happen: updates stop at iteration {end:,} "
                    f"(end_fraction {self.end_fraction:g} of {total:,}); allowed: below {max(end, 1):,}")
        return None


class DSR(Callback):
    """The reallocation as a training callback; H lives in its state."""

    def __init__(self, params: DSRParams, end_iter: int, seed: int):
        self.p, self.end_iter, self.seed = params, end_iter, seed
        self.threshold = params.threshold
        self.updates: list[dict[str, float]] = []

    def due(self, it: int) -> bool:
        return 0 < it < self.end_iter and it % self.p.interval == 0

    def after_backward(self, state: TrainState) -> None:
        if self.due(state.it):
            state.mask = self.update(state.it, state.model, state.opt, state.mask)

    @torch.no_grad()
    def update(self, it: int, model: torch.nn.Module, opt: torch.optim.Optimizer, mask: Mask) -> Mask:
        params, names = dict(model.named_parameters()), list(mask)
        pruned, kept = {}, {}
        for name in names:
            m, w = mask[name], params[name].detach().abs().cpu()
            small = m & (w < self.threshold)
            if m.any() and torch.equal(small, m):  # never empty a layer: keep its largest weight
                flat = m.reshape(-1).nonzero().squeeze(1)
                best = flat[torch.sort(w.reshape(-1)[flat], descending=True, stable=True).indices[0]]
                small = small & ~flat_to_mask(best.reshape(1), m.shape)
            pruned[name], kept[name] = small, m & ~small
        k = sum(int(s.sum()) for s in pruned.values())
        grow = apportion(k, [int(kept[n].sum()) for n in names], [int((~mask[n]).sum()) for n in names])
        gen, new = generator(self.seed, it), {}
        for name, g in zip(names, grow):
            free = (~mask[name]).reshape(-1).nonzero().squeeze(1)  # not the ones pruned just now
            born = flat_to_mask(free[sample_distinct(free.numel(), g, gen)], mask[name].shape)
            w = params[name]
            w[pruned[name].to(w.device)] = 0
            w[born.to(w.device)] = 0
            fresh_state(opt, w, born)
            new[name] = kept[name] | born
        used = self.threshold
        if k > (1 + self.p.delta) * self.p.n_prune:
            self.threshold /= 2
        elif k < (1 - self.p.delta) * self.p.n_prune:
            self.threshold *= 2
        self.updates.append({"iteration": it, "threshold": used, "pruned": k, "grown": sum(grow)})
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "updates": list(self.updates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.threshold = float(state.get("threshold", self.p.threshold))
        self.updates[:] = state.get("updates", [])

    def record(self) -> dict[str, Any]:
        return {"mask_updates": self.updates}


@register("dsr", label="DSR", params=DSRParams,
          description="Mostafa & Wang 2019: prune below one adaptive global threshold, regrow at random, split "
                      "across layers by their surviving weights")
def build(d: dict[str, Any], total: int, seed: int) -> DSR:
    params = DSRParams.model_validate(d["params"])
    return DSR(params, int(params.end_fraction * total), seed)
