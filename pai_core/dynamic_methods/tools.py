"""What the dynamic methods share: seeded draws, an exact integer split of a regrowth budget
across layers, and fresh optimizer state for new connections."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

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
