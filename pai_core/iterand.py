"""IteRand (Chijiwa et al., NeurIPS 2021): edge-popup whose pruned weights are redrawn every
K_per score steps, so a less over-parameterized random net still hides a good subnetwork. What each default follows (dchiji-ntt/iterand):
- which weights: those outside the current top-k, from the scores as they are after the step
  (sparse_modules.py `rerandomize`: the same GetSubnet mask the forward uses); kept weights,
  the scores and the optimizer state are untouched. The reference ranks raw scores; edge-popup
  here ranks |s| (hidden-networks), and IteRand uses the very mask its forward uses.
- how: each pruned weight is replaced by a fresh draw with probability r, else left as it is
  (`rerand_mode: bernoulli`, b ~ Bernoulli(rerand_lambda), the paper's partial randomization;
  every config of the reference uses it). r = 0.1, K_per = 300 iterations: the paper's CIFAR-10
  settings (config.yaml `cifar10_resnet18_sc_iterand`; ImageNet: 1000).
- from what: the distribution the frozen weights came from (`init_param_` with the layer's
  init_mode: signed constant for `sc`, Kaiming uniform for `ku`); here a fresh build of the
  model at a seed drawn from (run seed, iteration), put through the same transform.
- when: after score steps K, 2K, ... (the paper's loop); the reference's code does it before
  step K, 2K, ..., i.e. after K-1, 2K-1, ... steps: `timing="reference"`.
- not offered: the code's `manual` mode (θ ← λθ + μθ' on pruned weights) and `rerand_rate`
  (only the lowest-scoring fraction of the pruned weights may be redrawn; default 1.0 = all),
  neither used by any of its configs.
The stored weights are the last ones, which the evaluation uses: a weight redrawn while pruned
may have been selected since.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping

import torch
from torch import nn

from pai_core.supermask import Selector, signed_kaiming_constant
from pai_core.training import Callback, TrainState

RERAND_TIMINGS = ("paper", "reference")
FROZEN_WEIGHTS = ("signed_constant", "init")


def _seed_of(*parts: object) -> int:
    """An independent 63-bit seed per tuple of parts (blake2b of their text)."""
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "big") >> 1


def redraw_seed(seed: int, it: int) -> int:
    """The model seed of the fresh weights IteRand draws after `it` score steps."""
    return _seed_of("iterand-weights", seed, it)


@torch.no_grad()
def frozen_weights(model: nn.Module, names: list[str], kind: str) -> dict[str, torch.Tensor]:
    """The frozen values of `names` for a freshly built `model`: its init (`init`) or the
    signed Kaiming constant of it (`signed_constant`, edge-popup's)."""
    if kind not in FROZEN_WEIGHTS:
        raise ValueError(f"weights must be one of {FROZEN_WEIGHTS}, not {kind!r}")
    params = dict(model.named_parameters())
    return {n: signed_kaiming_constant(params[n]) if kind == "signed_constant" else params[n].detach().clone()
            for n in names}


def rerandomize_due(done: int, every: int, timing: str = "paper") -> bool:
    """Whether weights are redrawn once `done` score steps are complete: after steps K, 2K, ...
    (`paper`), or before them, i.e. after K-1, 2K-1, ... (`reference`, the authors' code)."""
    if timing == "paper":
        return done > 0 and done % every == 0
    return (done + 1) % every == 0


@torch.no_grad()
def rerandomize(weights: Mapping[str, torch.Tensor], kept: Mapping[str, torch.Tensor],
                fresh: Mapping[str, torch.Tensor], rate: float, seed: int, it: int) -> int:
    """In place: w ← fresh where b ∧ ¬kept, else w, with b ~ Bernoulli(rate) per weight.

    b is drawn on the CPU from (seed, it, layer index in `weights`' order), so the outcome does
    not depend on the device or on anything that ran before. Returns the count redrawn."""
    redrawn = 0
    for i, (name, w) in enumerate(weights.items()):
        gen = torch.Generator().manual_seed(_seed_of("iterand-b", seed, it, i))
        pick = (torch.rand(w.shape, generator=gen) < rate) & ~kept[name].detach().cpu().bool()
        redrawn += int(pick.sum())
        w.copy_(torch.where(pick.to(w.device), fresh[name].to(w.device, w.dtype), w))
    return redrawn


class IteRand(Callback):
    """IteRand's rerandomization riding along an edge-popup Selector's score training.

    `draw(it)` gives fresh candidate weights (name → tensor) for the redraw after `it` steps;
    it must depend on `it` alone (the select stage builds the model at `redraw_seed`), so a
    resumed run redraws exactly what an uninterrupted one would. The weights themselves travel
    in the checkpoint with the Selector's state; `events` (iteration, count) too."""

    def __init__(self, selector: Selector, every: int, rate: float,
                 draw: Callable[[int], Mapping[str, torch.Tensor]], timing: str = "paper"):
        if selector.method != "edge_popup":
            raise ValueError("IteRand rerandomizes an edge_popup Selector")
        if timing not in RERAND_TIMINGS:
            raise ValueError(f"timing must be one of {RERAND_TIMINGS}, not {timing!r}")
        if every < 1 or not 0 <= rate <= 1:
            raise ValueError(f"every must be >= 1 and rate in [0, 1], not {every!r}, {rate!r}")
        self.selector, self.every, self.rate, self.draw, self.timing = selector, every, rate, draw, timing
        self.events: list[dict[str, int]] = []

    def step(self, it: int) -> int:
        """Redraw now, as due after `it` steps: the pruned weights by the current scores."""
        sel = self.selector
        params = dict(sel.model.named_parameters())
        n = rerandomize({name: params[name] for name in sel.names}, sel.eval_masks()[0], self.draw(it),
                        self.rate, sel.seed, it)
        self.events.append({"iteration": it, "redrawn": n})
        return n

    def on_start(self, state: TrainState) -> None:
        if state.it == 0 and rerandomize_due(0, self.every, self.timing):  # the reference's K = 1
            self.step(0)

    def on_step_end(self, state: TrainState) -> None:
        if rerandomize_due(state.it, self.every, self.timing):
            self.step(state.it)

    def state_dict(self) -> dict[str, Any]:
        return {"events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = [dict(e) for e in state.get("events", [])]

    def record(self) -> dict[str, Any]:
        return {"rerandomized": self.events}
