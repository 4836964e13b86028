"""Top-KAST (Jayakumar, Pascanu, Rae, Osindero & Elsen, "Top-KAST: Top-K Always Sparse
Training", NeurIPS 2020): sparse in the forward *and* the backward pass, the mask chosen by
magnitude among weights that keep training while unused.

Each masked layer holds dense parameters θ (n of them) and keeps a fixed count k, its count in
the spec's start mask (ERK densities in the configs; D = k/n):
* the forward set A: the k largest |θ|. The net computes with θ ⊙ 1[A]; A is the training's mask.
* the backward set B ⊇ A: the ⌊b·k⌉ largest |θ| (b = `backward_multiple`, at most n; the paper's
  90 % forward / 80 % backward sparsity is b = 2). Only B learns: A through the training's
  optimizer, B \\ A by the same gradient, ∂L/∂α at the sparse forward α = θ ⊙ 1[A] (which the
  masked loop computes for every weight, used or not), at the step's learning rate. θ outside B
  does not change: a weight that left B keeps its value and returns once the
  others' magnitudes fall below it.
* the exploration penalty: L2 with coefficient λ on A and λ/D on B \\ A, so a weight explored but
  unused decays D⁻¹ times faster and enters A only if the loss keeps pushing it up. It is the
  method's own regulariser: without it only the gradient shrinks a weight of A, and the mask
  stays near the init's top-k (measured on LeNet-300-100 at 99.5 %: docs/results.md). λ =
  `penalty`, added to the loss's gradient on A (on top of any weight decay of the optimizer); by
  default (unset) λ is the optimizer's weight decay, which then is A's penalty already.
* both sets are chosen again from |θ| every `update_interval` steps (the paper: every step; it
  reports every 100 as good). A weight entering A brings its value from θ and starts with fresh
  optimizer state; one leaving A keeps its value in θ.

Here, in the masked training loop:
* the start: A₀ is the top-k of the *dense* init (the loop's `before_masking` hook sees it before
  the start mask zeroes it), whatever weights the spec's start mask chose; that mask only sets the
  counts. A random ERK start mask and a magnitude one give the same A₀ at the same densities.
* θ lives in the callback (one dense copy of the masked layers); the model holds θ ⊙ 1[A]. B \\ A
  is stepped in `after_backward`, before the loop masks the gradients to A; the sets are chosen in
  `on_step_end`, after the optimizer's step, and the model's weights rewritten at once, so the next
  forward uses them; the new mask reaches the loop at the next `after_backward`.
* the paper trains with plain SGD, where both sets take the same step. Here B \\ A is stepped by a
  second instance of the training's optimizer (same class and settings, its own state, weight
  decay λ/D), so with momentum or Adam the explored weights move as the used ones do rather than
  by raw gradient steps at Adam's small learning rate. A weight entering B \\ A (from A or from
  outside B) starts that optimizer's state afresh; θ outside B \\ A is restored after its step
  (momentum and decay must not move it).
* the compute is the masked loop's: the gradient is computed dense and then restricted to B, so
  the method's arithmetic is Top-KAST's but not its savings (those need sparse kernels).
* ties in |θ| go to the lower flat index, so a resumed run chooses exactly as an uninterrupted one
  (θ, B and the per-layer counts are part of the callback's checkpointed state).
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from pai_core.dynamic_methods.registry import MethodParams, register
from pai_core.dynamic_methods.tools import fresh_state
from pai_core.masks import Mask
from pai_core.training import Callback, TrainState


class TopKASTParams(MethodParams):
    backward_multiple: float = Field(2.0, ge=1, le=1e6, description="|B| / |A| per layer: the backward set's size "
                                                                     "as a multiple of the forward set's (90 % "
                                                                     "forward, 80 % backward sparsity: 2; 1: no "
                                                                     "exploration)")
    update_interval: int = Field(1, ge=1, le=10**9, description="steps between choices of A and B by |θ| (paper: "
                                                                "every step; it reports 100 as good)")
    penalty: float | None = Field(None, ge=0, le=1e6, description="λ of the exploration penalty: λθ added to A's "
                                                                  "gradient, λθ/D to B \\ A's; default: the "
                                                                  "optimizer's weight decay (then A's is that)")

    def schedule_problem(self, total: int, iterations_per_epoch: int) -> str | None:
        if self.update_interval >= total:
            return (f"params.update_interval: no set would be chosen again: {self.update_interval:,} steps between "
                    f"choices in {total:,} iterations; allowed: below {total:,}")
        return None


def _largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask of the k largest entries of `flat`, ties to the lower index: what a stable
    descending sort's first k give, in O(n) (kthvalue) rather than a sort, since it runs every step."""
    n = flat.numel()
    if k >= n or k <= 0:
        return torch.full((n,), k > 0, dtype=torch.bool, device=flat.device)
    v = torch.kthvalue(flat, n - k + 1).values
    out = flat > v
    ties = (flat == v).nonzero().squeeze(1)[: k - int(out.sum())]
    out[ties] = True
    return out


def top_sets(values: torch.Tensor, k_forward: int, k_backward: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as bool masks of `values`' shape: its k_forward and k_backward largest |values|, ties
    to the lower flat index, so A ⊆ B."""
    flat = values.detach().abs().reshape(-1)
    return _largest(flat, k_forward).view(values.shape), _largest(flat, k_backward).view(values.shape)


class TopKAST(Callback):
    """The two sets as a training callback (see the module docstring)."""

    def __init__(self, params: TopKASTParams, total: int):
        problem = params.schedule_problem(total, 1)
        if problem:
            raise ValueError(problem)
        self.p, self.total = params, total
        self.theta: dict[str, torch.Tensor] | None = None  # dense θ per masked layer
        self.backward: dict[str, torch.Tensor] = {}  # B per layer (bool, θ's device)
        self._explore: dict[str, torch.Tensor] = {}  # B \ A per layer, θ's device (a cache)
        self.counts: dict[str, tuple[int, int]] = {}  # (|A|, |B|) per layer
        self.pending = False  # the mask changed after a step: hand it to the loop at the next after_backward
        self.on_forward = params.penalty or 0.0  # λ added to A's gradient (else the optimizer's decay is A's)
        self.shadow: torch.optim.Optimizer | None = None  # steps B \ A (built at the start: it needs the optimizer)
        self._shadow_saved: dict[str, Any] | None = None  # its state from a checkpoint, until it is built
        self.entered = 0  # weights that entered A since the last epoch end
        self.updates: list[dict[str, float]] = []

    def before_masking(self, state: TrainState) -> None:
        if self.theta is not None or state.mask is None:  # resumed: θ and B come from the checkpoint
            return
        params = dict(state.model.named_parameters())
        b = self.p.backward_multiple
        self.counts = {n: (int(m.sum()), min(m.numel(), round(b * int(m.sum())))) for n, m in state.mask.items()}
        self.theta = {n: params[n].detach().clone() for n in state.mask}
        state.mask = self._choose(state, first=True)

    def on_start(self, state: TrainState) -> None:
        if self.theta is not None and self.shadow is None:
            self.shadow = self._shadow_optimizer(state.opt)
            if self._shadow_saved is not None:  # resumed: B \ A from the checkpoint's B and mask
                self.shadow.load_state_dict(self._shadow_saved)
                self._shadow_saved = None
                self._explore = {n: b & ~state.mask[n].to(b.device, torch.bool) for n, b in self.backward.items()}

    def _shadow_optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The training's optimizer class and settings over θ, one group per layer, weight decay
        λ·n/k (λ/D) in each."""
        decay = self.p.penalty if self.p.penalty is not None else opt.param_groups[0].get("weight_decay", 0.0)
        settings = {k: v for k, v in opt.param_groups[0].items() if k in opt.defaults and k != "weight_decay"}
        groups = [{"params": [t], "weight_decay": decay * t.numel() / max(self.counts[n][0], 1)}
                  for n, t in self.theta.items()]
        return type(opt)(groups, **settings)

    def after_backward(self, state: TrainState) -> None:
        if self.pending:  # a new dict object: the loop rebuilds its enforcer from it before this step
            state.mask, self.pending = dict(state.mask), False
        if self.shadow is None:
            return
        params, explored = dict(state.model.named_parameters()), {}
        with torch.no_grad():
            for name, forward in state.mask.items():
                k, kb = self.counts[name]
                g, theta = params[name].grad, self.theta[name]
                theta.grad = None
                if g is not None and self.on_forward:  # λθ on A: the model holds θ there, 0 elsewhere
                    g.add_(params[name].detach(), alpha=self.on_forward)
                if kb == k or g is None:
                    continue
                explore = self._explore[name]
                theta.grad = torch.where(explore, g.to(theta.dtype), torch.zeros((), dtype=theta.dtype,
                                                                                  device=theta.device))
                explored[name] = (explore, theta.clone())
            if not explored:
                return
            lr = state.opt.param_groups[0]["lr"]
            for group in self.shadow.param_groups:
                group["lr"] = lr
            self.shadow.step()
            for name, (explore, before) in explored.items():  # only B \ A moves
                self.theta[name].copy_(torch.where(explore, self.theta[name], before))

    def on_step_end(self, state: TrainState) -> None:
        if state.it % self.p.update_interval == 0 and state.it < self.total:
            new = self._choose(state)
            if new is not state.mask:
                state.mask, self.pending = new, True

    @torch.no_grad()
    def _choose(self, state: TrainState, first: bool = False) -> Mask:
        """A and B from |θ| (θ on A read from the model, which trained it), the model's weights
        rewritten to θ ⊙ 1[A]. Returns a new mask when A moved in any layer, else the same one."""
        params, mask = dict(state.model.named_parameters()), state.mask
        new, moved = {}, first
        for name, old in mask.items():
            w, theta = params[name], self.theta[name]
            on = old.to(w.device, torch.bool)
            if not first:
                theta.copy_(torch.where(on, w.detach().to(theta.dtype), theta))
            forward, self.backward[name] = top_sets(theta, *self.counts[name])
            explore = self.backward[name] & ~forward
            if self.shadow is not None:  # new to B \ A: no history in the explorers' optimizer
                fresh_state(self.shadow, theta, explore & ~self._explore[name])
            self._explore[name] = explore
            came = forward & ~on
            if first or bool(came.any()):
                w.copy_(torch.where(forward, theta, torch.zeros((), dtype=theta.dtype, device=theta.device)))
                if not first:
                    fresh_state(state.opt, w, came)
                    self.entered += int(came.sum())
                new[name], moved = forward.cpu(), True
            else:
                new[name] = old
        return {**mask, **new} if moved else mask

    def on_epoch_end(self, state: TrainState, row: dict[str, float]) -> None:
        self.updates.append({"iteration": state.it, "entered": self.entered})  # weights that entered A this epoch
        self.entered = 0

    def state_dict(self) -> dict[str, Any]:
        return {"theta": None if self.theta is None else {n: t.clone() for n, t in self.theta.items()},
                "backward": {n: b.cpu().clone() for n, b in self.backward.items()},
                "counts": {n: list(c) for n, c in self.counts.items()}, "pending": self.pending,
                "shadow": None if self.shadow is None else self.shadow.state_dict(),
                "entered": self.entered, "updates": list(self.updates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        theta = state.get("theta")
        self.theta = None if theta is None else {n: t.clone() for n, t in theta.items()}
        self.backward = {n: b.to(self.theta[n].device, torch.bool) for n, b in state.get("backward", {}).items()}
        self._explore = {}
        self.counts = {n: (int(c[0]), int(c[1])) for n, c in state.get("counts", {}).items()}
        self.pending = bool(state.get("pending", False))
        self.shadow, self._shadow_saved = None, state.get("shadow")
        self.entered = int(state.get("entered", 0))
        self.updates[:] = state.get("updates", [])

    def record(self) -> dict[str, Any]:
        return {"mask_updates": self.updates}


@register("topkast", label="Top-KAST", params=TopKASTParams,
          description="Jayakumar et al. 2020: per layer, the forward set A = top-k |θ| and a larger backward set B "
                      "(backward_multiple); only B trains, B \\ A with an L2 penalty scaled by 1/D; both chosen "
                      "again from |θ| every update_interval steps")
def build(d: dict[str, Any], total: int, seed: int) -> TopKAST:
    return TopKAST(TopKASTParams.model_validate(d["params"]), total)
