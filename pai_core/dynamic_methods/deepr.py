"""DeepR (Bellec, Kappel, Maass & Legenstein, "Deep Rewiring: training very sparse deep
networks", ICLR 2018).

Every connection has a sign s fixed for the whole run; an active one carries θ > 0 and
its weight is w = s·θ, a dormant one has w = 0. Each iteration, on the active connections:

    θ ← θ − η·∂E/∂θ − η·α + sqrt(2·η·T)·ν,   ν ~ N(0, 1)

then every connection whose θ fell below 0 turns dormant, and as many dormant connections
of the same layer (the one just killed included) are revived uniformly at random, so each
layer's active count is the same after every step.

Here, in the masked training loop (no reparametrisation, the weights stay `w`):
* the sign: that of the initial weight for the connections active at the start, a fair
  coin (seeded) for the dormant ones, whose initial weight the mask has zeroed. The
  reference (guillaumeBellec/deep_rewiring, `script_mnist_deep_rewiring.py`) draws every
  sign at random, independently of w₀, and starts θ at |w₀|.
* the gradient step is the optimizer's step on w (= s·θ, so the same step on θ for SGD).
* the L1 term is added to the gradient of the active weights in `after_backward`
  (α·s = ∂(α·θ)/∂w): exactly −η·α on θ with plain SGD, as the paper writes it; with
  momentum or Adam it goes through the optimizer like any loss term (the DSR authors'
  DeepR runs put it in the loss the same way, `--L1-loss-coeff`).
* noise, the sign check and revival run in `on_step_end`, after the step, with η the
  step's learning rate. The new mask is handed to the loop at the next `after_backward`
  (the hook where a callback replaces `state.mask`), before that step's masked update.
* a revived connection gets θ = ε = 1e-12 (the reference's `epsilon`: θ > 0, so it is
  active) and fresh optimizer state; a killed one is zeroed at once.

Defaults (the reference script, which trains LeNet-300-100 on MNIST with SGD, lr 0.5,
batch 10): α = 1e-5 (`l1`); its noise is lr·1e-5·ν per step (`gdnoise`), i.e.
sqrt(2·η·T) with T = (0.5·1e-5)² / (2·0.5) = 2.5e-11. Rewiring runs for the whole training
(`end_fraction` 1; the DSR authors' DeepR runs stop at 95 %).

Random draws at iteration t come from generators seeded by (node key, t): a resumed run
rewires exactly as an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from pai_core.dynamic_methods.registry import MethodParams, register
from pai_core.dynamic_methods.tools import fresh_state_at, generator, sample_inactive
from pai_core.masks import Mask
from pai_core.training import Callback, TrainState

_SIGN, _NOISE, _REVIVE = 0x516E, 0x4E01, 0x2E71  # separate streams: signs, noise, revivals


class DeepRParams(MethodParams):
    alpha: float = Field(1e-5, ge=0, le=1, description="α: L1 coefficient on the active connections' θ")
    temperature: float = Field(2.5e-11, ge=0, le=1, description="T: noise std sqrt(2·η·T) added to θ every step")
    revive_theta: float = Field(1e-12, gt=0, le=1, description="θ of a revived connection (the reference's ε)")
    end_fraction: float = Field(1.0, gt=0, le=1, description="no rewiring (nor L1, noise) after this fraction "
                                                             "of training")

    def schedule_problem(self, total: int, iterations_per_epoch: int) -> str | None:
        if int(self.end_fraction * total) < 1:
            return (f"params.end_fraction: no step would rewire ({self.end_fraction:g} of {total:,} iterations); "
                    f"allowed: at least {1 / total:.3g}")
        return None


class DeepR(Callback):
    """The rewiring rule as a training callback (see the module docstring)."""

    def __init__(self, params: DeepRParams, end_iter: int, seed: int):
        self.p, self.end_iter, self.seed = params, end_iter, seed
        self.sign: dict[str, torch.Tensor] | None = None  # int8 ±1 per layer, fixed for the run
        self.pending = False  # the mask changed after a step: hand it to the loop at the next after_backward
        self.killed = self.revived = 0  # since the last epoch end
        self.updates: list[dict[str, float]] = []
        self._signs_on: dict[str, torch.Tensor] = {}  # float copies on the weights' device
        self._active: dict[str, torch.Tensor] = {}  # per layer, the mask's active flat indices (a cache)

    def on_start(self, state: TrainState) -> None:
        self._active = {}
        if self.sign is None:  # a resumed run has its signs from the checkpoint
            self.sign = initial_signs(state.model, state.mask, generator(self.seed, 0, _SIGN))

    def _signs(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        for name, s in self.sign.items():
            p, cached = params[name], self._signs_on.get(name)
            if cached is None or cached.device != p.device or cached.dtype != p.dtype:
                self._signs_on[name] = s.to(p.device, p.dtype)
        return self._signs_on

    def after_backward(self, state: TrainState) -> None:
        if self.pending:  # a new dict object: the loop rebuilds its enforcer from it before this step
            state.mask, self.pending = dict(state.mask), False
        if state.it >= self.end_iter or not self.p.alpha:
            return
        params, signs = dict(state.model.named_parameters()), self._signs(state.model)
        for name in state.mask:
            p = params[name]
            if p.grad is not None:  # dormant entries are zeroed by the enforcer right after
                p.grad.add_(signs[name], alpha=self.p.alpha)

    def on_step_end(self, state: TrainState) -> None:
        t = state.it - 1  # the iteration whose step just ran
        if t >= self.end_iter:
            return
        lr = state.opt.param_groups[0]["lr"]
        new, killed, revived = rewire(state.model, state.opt, state.mask, self._signs(state.model), self.p,
                                      math.sqrt(2 * lr * self.p.temperature), generator(self.seed, t, _NOISE),
                                      generator(self.seed, t, _REVIVE), self._active)
        if new is not state.mask:
            state.mask, self.pending = new, True
        self.killed += killed
        self.revived += revived

    def on_epoch_end(self, state: TrainState, row: dict[str, float]) -> None:
        self.updates.append({"iteration": state.it, "killed": self.killed, "revived": self.revived})
        self.killed = self.revived = 0

    def state_dict(self) -> dict[str, Any]:
        return {"sign": None if self.sign is None else {k: v.clone() for k, v in self.sign.items()},
                "pending": self.pending, "killed": self.killed, "revived": self.revived,
                "updates": list(self.updates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sign = state.get("sign")
        self.sign = None if sign is None else {k: v.to("cpu", torch.int8).clone() for k, v in sign.items()}
        self._signs_on, self._active = {}, {}
        self.pending = bool(state.get("pending", False))
        self.killed, self.revived = int(state.get("killed", 0)), int(state.get("revived", 0))
        self.updates[:] = state.get("updates", [])

    def record(self) -> dict[str, Any]:
        return {"mask_updates": self.updates}


def initial_signs(model: torch.nn.Module, mask: Mask, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Each connection's fixed sign: the initial weight's where it is non-zero (the active
    ones), a seeded fair coin where the mask has zeroed it."""
    params, out = dict(model.named_parameters()), {}
    for name, m in mask.items():
        w = params[name].detach().cpu()
        coin = torch.randint(2, tuple(w.shape), generator=gen).to(torch.int8) * 2 - 1
        out[name] = torch.where(w > 0, 1, torch.where(w < 0, -1, coin)).to(torch.int8)
    return out


@torch.no_grad()
def rewire(model: torch.nn.Module, opt: torch.optim.Optimizer, mask: Mask, sign: dict[str, torch.Tensor],
           p: DeepRParams, noise_std: float, noise_gen: torch.Generator, revive_gen: torch.Generator,
           active: dict[str, torch.Tensor] | None = None) -> tuple[Mask, int, int]:
    """One DeepR step after the optimizer's: noise on θ, kill θ < 0, revive as many per layer.

    Works on the active entries' flat indices (`active`, a per-layer cache kept up to date
    here; sorted, so the noise each connection gets does not depend on the cache's history),
    so a step costs O(active) plus a few draws. Returns (the mask, the same object when
    nothing moved; killed; revived)."""
    params, new, killed = dict(model.named_parameters()), {}, 0
    active = {} if active is None else active
    for name, m in mask.items():
        w = params[name]
        idx = active.get(name)
        if idx is None:
            idx = active[name] = m.reshape(-1).nonzero().squeeze(1).to(w.device)
        flat = w.view(-1) if w.is_contiguous() else w.reshape(-1).clone()  # a copy for other layouts, written back
        s = sign[name].reshape(-1).to(w.device, w.dtype)
        s_on = s[idx]
        if noise_std > 0:
            nu = torch.randn(idx.numel(), generator=noise_gen).to(w.device, w.dtype)
            flat[idx] += s_on * nu * noise_std  # θ += sqrt(2ηT)·ν, w = s·θ
        dying = (s_on * flat[idx]) < 0
        k = int(dying.sum())
        if k:
            flat[idx[dying]] = 0
            alive = m.reshape(-1).clone()
            alive[idx[dying].cpu()] = False
            free = m.numel() - idx.numel() + k
            born = sample_inactive(alive, k, revive_gen, free)  # the just-killed included, as the reference
            born_on = born.to(w.device)
            flat[born_on] = s[born_on] * p.revive_theta
            fresh_state_at(opt, w, born)
            alive[born] = True
            new[name] = alive.view(m.shape)
            active[name] = torch.sort(torch.cat([idx[~dying], born_on])).values
            killed += k
        if not w.is_contiguous() and (k or noise_std > 0):
            w.copy_(flat.view(w.shape))
    if not new:
        return mask, 0, 0
    return {**mask, **new}, killed, killed


@register("deepr", label="DeepR", params=DeepRParams,
          description="Bellec et al. 2018: fixed-sign connections, L1 + noise; one that crosses zero dies and a "
                      "random dormant one is revived (count fixed every step)")
def build(d: dict[str, Any], total: int, seed: int) -> DeepR:
    params = DeepRParams.model_validate(d["params"])
    return DeepR(params, int(params.end_fraction * total), seed)
