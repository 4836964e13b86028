"""Dynamic sparse training: SET (Mocanu et al. 2018) and RigL (Evci et al. 2020).

Every `interval` iterations until `end_iter`, each layer drops k = ⌊f(t) · active⌋ of its
active weights, those of smallest magnitude, and grows k among all the weights not kept:
at random (SET) or by largest dense-gradient magnitude (RigL). The per-layer count never
changes, so the sparsity is exact after every update.

Which reference each behaviour follows (google-research/rigl, `rigl/sparse_optimizers.py`
and `rigl/rigl_tf2/mask_updaters.py`; the SET authors' dcmocanu/sparse-evolutionary-
artificial-neural-networks, `set_mlp_sparse_data_structures.py`):

* k and the grow candidates (`SparseSETOptimizer._get_update_op`, `MaskUpdater.
  generic_mask_update`): n_prune = int32(n_ones · drop_fraction), a floor; the grow scores
  of the n_ones − n_prune kept weights are lifted below every other, so any weight not
  kept, a just-dropped one included, may be grown, and k is never capped.
* A just-dropped weight that is regrown (`reinit_when_same=False` there) is not a "new
  connection": it keeps its value and its optimizer state, as if never dropped. Only
  weights inactive before the update are new: they take the grow init and their optimizer
  state (momentum, Adam moments) is zeroed (`reset_momentum`). `regrow_dropped=False`
  keeps the old behaviour here (grow only among the weights inactive before, k capped).
* Drop order is |w| with ties by index: `sparse_optimizers.py` adds N(0, 1e-5) noise to
  the drop scores, `rigl_tf2` (`get_drop_scores`, noise_std=0) does not; we follow the latter.
* `anneal` (`get_drop_fraction`): "cosine" f(t) = f0/2 · (1 + cos(π t / end)), the RigL
  paper's; "constant" f(t) = f0, the SET paper's ζ = 0.3 at every update (`zeta` in the
  SET authors' code).
* `grow_init` (`get_grow_tensor`): "zero" is the RigL repo's default for every method
  (flag `grow_init='zeros'`): a new weight does not change the network's output. "random"
  is the SET paper's: `weightsEvolution` gives each new connection randn()/10, the same
  law as its initial weights (`createSparseWeights`), with zero momentum. The layer's init
  law is not known here, so we draw N(0, σ²) with σ the std of the whole masked layer before
  the update, zeros included, as the RigL repo's "random_normal" does (`reduce_std(weights)`).
  The std of the active weights alone compounds from update to update and made SET diverge.
* `skip_step_on_update`: `SparseRigLOptimizer.apply_gradients` runs the mask update
  *instead of* the optimizer step on update iterations (True for RigL);
  `SparseSETOptimizer.apply_gradients` runs the step, then the update (False for SET).

The training loop reads `skip_step_on_update`: when True it must not call `opt.step()` on
an iteration where it called this updater (`due(it)` was true). The updater already
zeroes the dropped weights, so the model matches the returned mask whether or not a step
follows. With the step taken (SET), it comes after the update here (before it in the
reference), so this iteration's gradient also moves the grown weights.

Random draws at update t come from generators seeded by (seed, t): a resumed run draws the
same connections and the same values, on any device.
"""
from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from pai_core.masks import Mask

OPTIMIZER_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")

# The paper's choice per method for each keyword option (both papers drop 0.3 at first).
PAPER_DEFAULTS: dict[str, dict[str, Any]] = {
    "set": {"anneal": "constant", "grow_init": "random", "regrow_dropped": True, "skip_step_on_update": False},
    "rigl": {"anneal": "cosine", "grow_init": "zero", "regrow_dropped": True, "skip_step_on_update": True},
}
_INIT_STREAM = 0x5EED_1417  # separates the grow-value draws from the SET selection draws


@dataclass
class DynamicSparsity:
    method: str  # "set" | "rigl"
    interval: int
    drop_fraction: float
    end_iter: int
    seed: int  # draws at update t come from (seed, t), so a resumed run draws the same
    _: KW_ONLY
    # None = the method's paper default, `PAPER_DEFAULTS[method]`; resolved at construction.
    anneal: Literal["cosine", "constant"] | None = None
    grow_init: Literal["zero", "random"] | None = None
    regrow_dropped: bool | None = None  # False: grow only among the weights inactive before
    skip_step_on_update: bool | None = None  # the training loop skips opt.step() on updates
    updates: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key, value in self.paper_defaults(self.method).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.anneal not in ("cosine", "constant"):
            raise ValueError(f"anneal must be 'cosine' or 'constant', not {self.anneal!r}")
        if self.grow_init not in ("zero", "random"):
            raise ValueError(f"grow_init must be 'zero' or 'random', not {self.grow_init!r}")

    @classmethod
    def paper_defaults(cls, method: str) -> dict[str, Any]:
        """The keyword options as the method's paper / reference code has them."""
        if method not in PAPER_DEFAULTS:
            raise ValueError(f"unknown dynamic sparsity method {method!r}; known: {sorted(PAPER_DEFAULTS)}")
        return dict(PAPER_DEFAULTS[method])

    def due(self, it: int) -> bool:
        return 0 < it < self.end_iter and it % self.interval == 0

    def fraction(self, it: int) -> float:
        if self.anneal == "constant":
            return self.drop_fraction
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * it / self.end_iter))

    def _generator(self, it: int, stream: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + it) ^ stream) % 2**63)

    @torch.no_grad()
    def __call__(self, it: int, model: nn.Module, opt: torch.optim.Optimizer, mask: Mask) -> Mask:
        """Called after backward (dense gradients present), before the masked step."""
        params, f, new = dict(model.named_parameters()), self.fraction(it), {}
        pick, values = self._generator(it), self._generator(it, _INIT_STREAM)
        moved = regrown = 0
        for name, m in mask.items():
            p = params[name]
            was = m.reshape(-1).to(p.device)
            active = was.nonzero().squeeze(1)
            k = int(f * active.numel())  # floor, as the reference's int32 cast
            if not self.regrow_dropped:
                k = min(k, was.numel() - active.numel())
            if k == 0:
                new[name] = m
                continue
            w = p.view(-1)
            # the masked layer's std, zeros included (RigL's `random_normal`: reduce_std(weights)); the
            # active weights' alone would compound: each update drops the smallest and refills at
            # the survivors' spread, ~13 % more per update (SET diverged to loss 1e5 on LeNet)
            sigma = (w.float() * was).std(unbiased=False).item() if self.grow_init == "random" else 0.0
            drop = active[torch.sort(w[active].abs(), stable=True).indices[:k]]
            kept = was.clone()
            kept[drop] = False
            candidates = (~kept if self.regrow_dropped else ~was).nonzero().squeeze(1)
            if self.method == "rigl":
                order = torch.sort(p.grad.view(-1)[candidates].abs(), descending=True, stable=True).indices
            else:
                order = torch.randperm(candidates.numel(), generator=pick).to(p.device)
            now = kept.clone()
            now[candidates[order[:k]]] = True
            born = (now & ~was).nonzero().squeeze(1)  # new connections; a regrown weight is not one
            w[was & ~now] = 0.0  # dropped for good
            if self.grow_init == "random":
                w[born] = (torch.randn(born.numel(), generator=values) * sigma).to(p.device, p.dtype)
            else:
                w[born] = 0.0
            for key in OPTIMIZER_STATE:
                buf = opt.state.get(p, {}).get(key)
                if buf is not None:
                    buf.view(-1)[born] = 0.0
            new[name] = now.reshape(m.shape).cpu()
            moved += k
            regrown += k - born.numel()
        self.updates.append({"iteration": it, "fraction": f, "moved": moved, "regrown": regrown})
        return new
