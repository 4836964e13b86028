"""SR-STE (Zhou, Ma, Zhu, Liu, Zhang, Yuan, Sun & Li, "Learning N:M Fine-grained Structured
Sparse Neural Networks From Scratch", ICLR 2021): dense weights θ are trained, the net computes
with an N:M mask chosen from |θ| at every step, and the weights that mask removes are pulled
towards zero so that the mask settles.

Per masked layer, every step:
* forward: W̃ = θ ⊙ E, E the n largest |θ| of every group of m (`prune.structure: nm`, the
  groups `select_nm` uses, ties to the lower index: m consecutive weights of a row of
  `weight.reshape(out, -1)`, or with `prune.nm_groups: channels` m input channels at one kernel
  position, the authors' order for a conv); with `prune.structure: unstructured`, E is the
  layer's k largest |θ|, k the start mask's count (its scope, ERK say, sets the densities);
* backward (the straight-through estimator): the gradient at W̃, for every weight, is θ's;
* sparse-refined term: λ_W (1 − E) ⊙ θ is added to that gradient (λ_W = `decay`, 2e-4 as in the
  authors' code, NM-sparsity's `Sparse.backward`), so a weight the mask removes decays and the
  mask flips less often (the paper's flip rate, recorded per epoch here as `flip_rate`);
* θ takes one step of the training's own optimizer (same class, settings and weight decay; the
  loop's learning rate), so momentum and Adam moments belong to θ and survive a weight moving in
  or out of the mask, as in the reference, where θ is the layer's parameter.

Here, in the masked training loop: θ lives in the callback and the model holds W̃. The
model's gradient for a masked weight is exactly ∂L/∂W̃ (the loop computes it dense, before it
masks it), which is what the STE hands θ. `after_backward` steps θ and takes those gradients
away from the training's optimizer (it leaves the masked weights alone: θ is their weight);
`on_step_end` chooses E again every `update_interval` steps (the paper: every forward) and
rewrites the model's weights to θ ⊙ E after every step, so the next forward uses them.
The start mask's own choice is replaced by E(θ₀) at the first step: only its structure and
counts matter. A layer whose group axis m does not divide (left dense by
`prune.nm_indivisible: dense`) is not SR-STE's: it trains as an ordinary dense layer. θ, the
optimizer's state over it and the flip counts are checkpointed, so a resumed run continues
exactly.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from pai_core.dynamic_methods.registry import MethodParams, register
from pai_core.dynamic_methods.topkast import top_sets
from pai_core.masks import Mask
from pai_core.prune_checks import nm_row
from pai_core.selection import nm_unview, nm_view
from pai_core.training import Callback, TrainState


class SRSTEParams(MethodParams):
    decay: float = Field(2e-4, ge=0, le=1e3, description="λ_W of the sparse-refined term: λ_W·θ added to the "
                                                         "gradient of every weight the mask removes (the "
                                                         "authors' code: 2e-4; 0: plain STE)")
    update_interval: int = Field(1, ge=1, le=10**9, description="steps between choices of the mask from |θ| (the "
                                                                "paper: every forward)")

    def display_label(self, label: str) -> str:
        return "STE" if self.decay == 0 else label  # without the sparse-refined term: the paper's baseline

    def schedule_problem(self, total: int, iterations_per_epoch: int) -> str | None:
        if self.update_interval >= total:
            return (f"params.update_interval: the mask would never be chosen again: {self.update_interval:,} steps "
                    f"between choices in {total:,} iterations; allowed: below {total:,}")
        return None


def nm_top(values: torch.Tensor, n: int, m: int, groups: str = "rows") -> torch.Tensor:
    """A bool mask of `values`' shape: the n largest |values| of every group of m (`groups`: as
    selection.select_nm's, whose check guarantees that m divides every group axis), ties to the
    lower index (a stable sort), on `values`' device: the mask select_nm would choose."""
    viewed = nm_view(values.detach().abs(), groups)
    runs = viewed.reshape(-1, m)
    order = torch.sort(runs, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros(runs.shape, dtype=torch.bool, device=values.device).scatter_(1, order, True)
    return nm_unview(keep.view(viewed.shape), groups).contiguous()


class SRSTE(Callback):
    """SR-STE as a training callback (see the module docstring). `nm`: (n, m) or (n, m, groups),
    or None for a per-layer top-k at the start mask's counts."""

    def __init__(self, params: SRSTEParams, total: int, nm: tuple[int, int] | tuple[int, int, str] | None):
        problem = params.schedule_problem(total, 1)
        if problem:
            raise ValueError(problem)
        self.p, self.total, self.nm = params, total, nm
        self.theta: dict[str, torch.Tensor] | None = None  # dense θ per masked layer
        self.counts: dict[str, int] = {}  # kept weights per layer (unstructured)
        self.on: dict[str, torch.Tensor] = {}  # E per layer on θ's device (the CPU copy is the loop's mask)
        self.opt: torch.optim.Optimizer | None = None  # steps θ (built at the start: it copies the optimizer)
        self._opt_saved: dict[str, Any] | None = None  # its state from a checkpoint, until it is built
        self.pending = False  # the mask changed after a step: hand it to the loop at the next after_backward
        self.flips = 0  # mask entries changed since the last epoch end
        self.choices = 0  # mask choices since the last epoch end
        self.updates: list[dict[str, float]] = []

    def _select(self, name: str, theta: torch.Tensor) -> torch.Tensor:
        if self.nm is not None:
            return nm_top(theta, *self.nm)  # (n, m[, groups])
        return top_sets(theta, self.counts[name], self.counts[name])[0]

    def before_masking(self, state: TrainState) -> None:
        if self.theta is not None or state.mask is None:  # resumed: θ comes from the checkpoint
            return
        params = dict(state.model.named_parameters())
        self.counts = {n: int(m.sum()) for n, m in state.mask.items()}
        self.theta = {n: params[n].detach().clone() for n in state.mask if self._groups_fit(params[n].shape)}
        state.mask = self._choose(state, first=True)

    def _groups_fit(self, shape: torch.Size) -> bool:
        """Whether m divides the layer's group axis; a layer it does not divide was left dense by
        the start mask (`prune.nm_indivisible: dense`) and trains as an ordinary dense layer."""
        return self.nm is None or nm_row(tuple(shape), *self.nm[2:]) % self.nm[1] == 0

    def on_start(self, state: TrainState) -> None:
        if self.theta is None:
            return
        if not self.on:  # resumed: E from the checkpoint's mask
            self.on = {n: state.mask[n].to(t.device, torch.bool) for n, t in self.theta.items()}
        if self.opt is None:
            settings = {k: v for k, v in state.opt.param_groups[0].items() if k in state.opt.defaults}
            self.opt = type(state.opt)(list(self.theta.values()), **settings)
            if self._opt_saved is not None:
                self.opt.load_state_dict(self._opt_saved)
                self._opt_saved = None

    def after_backward(self, state: TrainState) -> None:
        if self.pending:  # a new dict object: the loop rebuilds its enforcer from it before this step
            state.mask, self.pending = dict(state.mask), False
        if self.opt is None:
            return
        params = dict(state.model.named_parameters())
        with torch.no_grad():
            for name, theta in self.theta.items():
                p = params[name]
                if p.grad is None:
                    theta.grad = None
                    continue
                g = p.grad.to(theta.dtype)
                if self.p.decay:
                    g = g + self.p.decay * torch.where(self.on[name], torch.zeros((), dtype=theta.dtype,
                                                                                   device=theta.device), theta)
                theta.grad, p.grad = g, None  # the training's optimizer leaves this weight to θ
            for group in self.opt.param_groups:
                group["lr"] = state.opt.param_groups[0]["lr"]
            self.opt.step()

    def on_step_end(self, state: TrainState) -> None:
        if self.theta is None:
            return
        if state.it % self.p.update_interval == 0 and state.it < self.total:
            new = self._choose(state)
            if new is not state.mask:
                state.mask, self.pending = new, True
            return
        params = dict(state.model.named_parameters())
        with torch.no_grad():
            for name, theta in self.theta.items():
                params[name].copy_(theta * self.on[name])

    @torch.no_grad()
    def _choose(self, state: TrainState, first: bool = False) -> Mask:
        """E from |θ| in every layer, the model's weights rewritten to θ ⊙ E. Returns a new mask
        dict when E moved in any layer (the changed layers as new CPU tensors), else the same one."""
        params, mask, new = dict(state.model.named_parameters()), state.mask, {}
        for name, theta in self.theta.items():
            keep = self._select(name, theta)
            params[name].copy_(theta * keep)
            if first:
                new[name] = keep.cpu()
            else:
                flipped = int((keep != self.on[name]).sum())
                if flipped:
                    new[name] = keep.cpu()
                    self.flips += flipped
            self.on[name] = keep
        if not first:
            self.choices += 1
        return {**mask, **new} if new else mask

    def on_epoch_end(self, state: TrainState, row: dict[str, float]) -> None:
        total = sum(t.numel() for t in self.theta.values()) if self.theta else 0
        rate = self.flips / (total * self.choices) if total and self.choices else 0.0
        self.updates.append({"iteration": state.it, "flipped": self.flips, "flip_rate": rate})
        self.flips = self.choices = 0

    def state_dict(self) -> dict[str, Any]:
        return {"theta": None if self.theta is None else {n: t.detach().clone() for n, t in self.theta.items()},
                "counts": dict(self.counts), "pending": self.pending,
                "opt": None if self.opt is None else self.opt.state_dict(),
                "flips": self.flips, "choices": self.choices, "updates": list(self.updates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        theta = state.get("theta")
        self.theta = None if theta is None else {n: t.clone() for n, t in theta.items()}
        self.counts = {n: int(c) for n, c in state.get("counts", {}).items()}
        self.on, self.opt, self._opt_saved = {}, None, state.get("opt")
        self.pending = bool(state.get("pending", False))
        self.flips, self.choices = int(state.get("flips", 0)), int(state.get("choices", 0))
        self.updates[:] = state.get("updates", [])

    def record(self) -> dict[str, Any]:
        return {"mask_updates": self.updates}


@register("sr_ste", label="SR-STE", params=SRSTEParams, keeps_nm=True,
          description="Zhou et al. 2021: dense θ trained through an N:M mask chosen from |θ| every step "
                      "(prune.structure nm; unstructured: per-layer top-k), straight-through gradients, the "
                      "removed weights decayed by λ_W (decay)")
def build(d: dict[str, Any], total: int, seed: int) -> SRSTE:
    nm = d.get("nm")  # [n, m] or [n, m, "channels"]
    return SRSTE(SRSTEParams.model_validate(d["params"]), total,
                 None if nm is None else (int(nm[0]), int(nm[1]), *(str(g) for g in nm[2:])))
