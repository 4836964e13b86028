"""What the dynamic methods share: seeded draws, an exact integer split of a regrowth budget
across layers, fresh optimizer state for new connections, and the in-time
over-parameterization rate every method's run records."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pai_core.training import Callback, TrainState

OPTIMIZER_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def generator(seed: int, it: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends on (seed, iteration, stream) only: a resumed run draws the
    same numbers as an uninterrupted one, on any device."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + it) ^ stream) % 2**63)


def sample_distinct(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct indices of range(n), uniformly at random (every k-subset equally likely).

    For k much smaller than n (a few connections revived among 200k dormant ones, every
    step) it draws with replacement and keeps the first k distinct draws, which costs O(k)
    instead of a permutation of n."""
    if k > n:
        raise ValueError(f"cannot draw {k} distinct of {n}")
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    if 8 * k >= n:
        return torch.randperm(n, generator=gen)[:k]
    picked: dict[int, None] = {}
    while len(picked) < k:
        for i in torch.randint(n, (2 * (k - len(picked)),), generator=gen).tolist():
            picked.setdefault(i, None)
            if len(picked) == k:
                break
    return torch.tensor(list(picked), dtype=torch.long)


def sample_inactive(active: torch.Tensor, k: int, gen: torch.Generator, free: int | None = None) -> torch.Tensor:
    """k distinct flat indices where the flat bool tensor `active` (CPU) is false, uniformly
    at random. With few to draw among many free positions (DeepR reviving a handful of
    connections every step), uniform draws over all positions, rejecting the active ones
    and repeats: each accepted draw is uniform over the free positions left, and no list
    of the free positions is built. `free`: their number, when the caller knows it."""
    free = active.numel() - int(active.sum()) if free is None else free
    if k > free:
        raise ValueError(f"cannot draw {k} of {free} free positions")
    if 8 * k >= free:
        candidates = (~active).nonzero().squeeze(1)
        return candidates[sample_distinct(free, k, gen)]
    picked: dict[int, None] = {}
    while len(picked) < k:
        draws = torch.randint(active.numel(), (2 * (k - len(picked)),), generator=gen)
        for i, taken in zip(draws.tolist(), active[draws].tolist()):
            if not taken:
                picked.setdefault(i, None)
                if len(picked) == k:
                    break
    return torch.tensor(list(picked), dtype=torch.long)


def apportion(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """Split `total` into integers proportional to `weights`, none above its cap.

    Largest remainders (Hamilton): each gets the floor of its quota, the leftover units go to
    the largest fractional parts, ties to the lower index. A layer that would pass its cap
    gets its cap and the rest is split again among the others, so the sum is exactly
    `min(total, sum(caps))`. All weights zero (or negative): equal weights."""
    n = len(weights)
    alloc = [0] * n
    remaining = min(total, sum(max(c, 0) for c in caps))
    open_ = [i for i in range(n) if caps[i] > 0]
    while remaining > 0 and open_:
        w = {i: max(float(weights[i]), 0.0) for i in open_}
        wsum = sum(w.values())
        if wsum <= 0 or not math.isfinite(wsum):
            w, wsum = {i: 1.0 for i in open_}, float(len(open_))
        quota = {i: remaining * w[i] / wsum for i in open_}
        give = {i: math.floor(q) for i, q in quota.items()}
        for i in sorted(open_, key=lambda i: (-(quota[i] - give[i]), i))[:remaining - sum(give.values())]:
            give[i] += 1
        full = [i for i in open_ if alloc[i] + give[i] >= caps[i]]
        for i in open_:
            give[i] = min(give[i], caps[i] - alloc[i])
            alloc[i] += give[i]
        remaining -= sum(give.values())
        open_ = [i for i in open_ if i not in full]
        if not full:
            break
    return alloc


def fresh_state(opt: torch.optim.Optimizer, p: torch.Tensor, where: torch.Tensor) -> None:
    """Zero the optimizer state (momentum, Adam moments) where `where` (a bool tensor shaped
    like `p`) is true: a new connection starts as a freshly initialised weight, with no
    history. Boolean indexing works whatever the memory layout (channels_last too)."""
    for key in OPTIMIZER_STATE:
        buf = opt.state.get(p, {}).get(key)
        if buf is not None:
            buf[where.to(buf.device)] = 0


def fresh_state_at(opt: torch.optim.Optimizer, p: torch.Tensor, flat_idx: torch.Tensor) -> None:
    """`fresh_state` at flat (row-major) indices, without building a mask when the buffers
    are contiguous (every step of DeepR)."""
    for key in OPTIMIZER_STATE:
        buf = opt.state.get(p, {}).get(key)
        if buf is None or not flat_idx.numel():
            continue
        if buf.is_contiguous():
            buf.view(-1)[flat_idx.to(buf.device)] = 0
        else:
            buf[flat_to_mask(flat_idx, buf.shape).to(buf.device)] = 0


def flat_to_mask(idx: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Flat (row-major) indices as a bool mask of `shape`, on the CPU."""
    out = torch.zeros(math.prod(shape), dtype=torch.bool)
    out[idx.cpu()] = True
    return out.view(shape)


def itop_rates(ever: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """R_s of a union of masks: the fraction of the masked weights ever active, in total
    (Σ ever / Σ numel, so large layers weigh more) and per layer."""
    layers = {n: int(m.sum()) / max(m.numel(), 1) for n, m in ever.items()}
    total = sum(m.numel() for m in ever.values())
    return sum(int(m.sum()) for m in ever.values()) / max(total, 1), layers


class InTimeOverparam(Callback):
    """A dynamic method's callback plus its in-time over-parameterization rate R_s (Liu, Yin,
    Mocanu & Pechenizkiy, ICML 2021): the fraction of the masked weights that were in the mask
    at some point of training. The union starts as the initial mask and every mask the
    training uses is OR'ed into it; `record()` adds `itop_rate` (total), `itop_layers` and
    `itop_history` (R_s after each entry of the method's `mask_updates`) to the method's own.

    As the reference (Shiweiliuiiiiiii/In-Time-Over-Parameterization, `sparselearning/core.py`:
    `fired_masks` is a copy of the initial mask, OR'ed with the mask after each
    `truncate_weights`): weights of the masked layers only (biases and BatchNorm are not in its
    masks, nor, by default, in ours; `prune.ignore`d layers have no mask and do not count), a
    weight grown at zero counts, a just-dropped weight regrown in the same update was active
    anyway, and the total is Σ fired / Σ weights. The reference ORs at each periodic update;
    here at every change of the mask, which is the same for the periodic methods and counts
    DeepR's every-step rewiring in full.

    A method hands the training loop a new tensor for every layer whose mask changed (none
    edits one in place), so only those are OR'ed: the cost is nothing on steps with no update.
    The union is part of the callback's state (beside the method's, under "itop"), so a resumed
    run reports what an uninterrupted one would. A checkpoint written before R_s was tracked
    has no union: that run records no R_s rather than an undercount."""

    STATE_KEY = "itop"

    def __init__(self, inner: Callback):
        self.inner = inner
        self.ever: dict[str, torch.Tensor] | None = None  # None: training has not started
        self.lost = False  # resumed from a checkpoint without the union
        self.history: list[dict[str, float]] = []
        self._seen: dict[str, torch.Tensor] = {}  # per layer, the mask tensor last OR'ed in
        self._updates = 0  # entries of the method's mask_updates already given an R_s

    def _observe(self, state: TrainState) -> None:
        if self.ever is None or state.mask is None:
            return
        for name, m in state.mask.items():
            if self._seen.get(name) is not m:
                m_cpu = m.detach().to("cpu", torch.bool)
                have = self.ever.get(name)
                self.ever[name] = m_cpu.clone() if have is None else have | m_cpu
                self._seen[name] = m
        updates = self.inner.record().get("mask_updates") or []
        if len(updates) > self._updates:
            self._updates = len(updates)
            self.history.append({"iteration": int(updates[-1].get("iteration", state.it)),
                                 "itop_rate": itop_rates(self.ever)[0]})

    def before_masking(self, state: TrainState) -> None:
        self.inner.before_masking(state)

    def on_start(self, state: TrainState) -> None:
        self.inner.on_start(state)
        self._seen = {}
        if self.ever is None and not self.lost and state.mask is not None:
            self.ever = {}
        self._updates = len(self.inner.record().get("mask_updates") or [])
        self._observe(state)

    def after_backward(self, state: TrainState) -> None:
        self.inner.after_backward(state)
        self._observe(state)

    def on_step_end(self, state: TrainState) -> None:
        self.inner.on_step_end(state)
        self._observe(state)

    def on_epoch_end(self, state: TrainState, row: dict[str, float]) -> None:
        self.inner.on_epoch_end(state, row)
        self._observe(state)

    def on_end(self, state: TrainState) -> None:
        self.inner.on_end(state)
        self._observe(state)

    def state_dict(self) -> dict[str, Any]:
        ever = None if self.ever is None else {n: m.clone() for n, m in self.ever.items()}
        ours = None if self.lost else {"ever": ever, "history": [dict(h) for h in self.history]}
        return {**self.inner.state_dict(), self.STATE_KEY: ours}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)  # the methods read their own keys and ignore the rest
        ours = state.get(self.STATE_KEY)
        self.lost, self._seen = ours is None, {}
        ever = None if ours is None else ours.get("ever")
        self.ever = None if ever is None else {n: m.to("cpu", torch.bool).clone() for n, m in ever.items()}
        self.history = [] if ours is None else [dict(h) for h in ours.get("history", [])]

    def record(self) -> dict[str, Any]:
        out = dict(self.inner.record())
        if self.ever and not self.lost:
            rate, layers = itop_rates(self.ever)
            out |= {"itop_rate": rate, "itop_layers": layers, "itop_history": [dict(h) for h in self.history]}
        return out
