"""From scores to a mask: keep the highest-scoring surviving weights.

Scopes: `global` ranks all layers together, `layerwise` keeps the same fraction of every
layer, `erk` gives each layer the Erdős–Rényi-kernel share, `smart_ratio` Su et al.'s
depth-decaying shares (random tickets), `uniform_plus` Gale et al.'s uniform with a dense first
conv and a floored last layer. Conventions (DESIGN.md §1):
higher score = keep; only weights still alive are ranked, so
a later round can only remove more; ties go to the lower flat index (a stable sort), so
the same scores always give the same mask. The kept count is rounded from the density
target of *this* round, not accumulated from per-round rounding, so round r of an
iterative schedule keeps round(n · (1-p)^r) weights whatever happened before.
"""
from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Literal

import torch

from pai_core.masks import Mask


def _top_k(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """Flat bool mask of the k best alive entries (stable: ties keep the lower index)."""
    keep = torch.zeros_like(alive)
    idx = alive.nonzero().squeeze(1)
    if k <= 0 or idx.numel() == 0:
        return keep
    order = torch.sort(scores[idx].double(), descending=True, stable=True).indices
    keep[idx[order[:k]]] = True
    return keep


def select(
    scores: dict[str, torch.Tensor],
    previous: Mask,
    density: float,
    scope: Literal["global", "layerwise", "erk", "smart_ratio", "uniform_plus"] = "global",
    min_density: float = 0.0,
    layer_density: dict[str, float] | None = None,
) -> Mask:
    """Mask keeping `density` of the weights in `previous`'s layers (see module doc).
    `layer_density` (layerwise only): {name pattern: density} for the layers it names."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    names = list(previous)
    for n in names:
        if not torch.isfinite(scores[n]).all():
            raise ValueError(f"scores for {n} contain NaN or inf")
    flat_scores = [scores[n].detach().reshape(-1).cpu() for n in names]
    flat_alive = [previous[n].reshape(-1).cpu().bool() for n in names]
    sizes = [s.numel() for s in flat_scores]

    # Each layer's floor is reserved first (its best survivors); the target is then filled
    # from what remains, per layer or across all layers. A floor can exceed the target.
    floor = [_top_k(s, a, min(math.ceil(min_density * n), int(a.sum())))
             for s, a, n in zip(flat_scores, flat_alive, sizes)]
    if layer_density and scope != "layerwise":
        raise ValueError(f"per-layer densities apply to scope layerwise, not {scope}")
    if scope != "global":
        targets = layer_counts([tuple(previous[n].shape) for n in names], density, scope)
        if layer_density:  # the named layers' own densities (Li et al.'s per-layer rates)
            targets = [round(previous[n].numel() * density_of(n, layer_density, density)) for n in names]
        kept = [f | _top_k(s, a & ~f, t - int(f.sum()))
                for f, s, a, t in zip(floor, flat_scores, flat_alive, targets)]
    else:
        rest = round(sum(sizes) * density) - sum(int(f.sum()) for f in floor)
        extra = _top_k(torch.cat(flat_scores).double(),
                       torch.cat([a & ~f for a, f in zip(flat_alive, floor)]), rest)
        kept = [f | e for f, e in zip(floor, torch.split(extra, sizes))]
    return {n: k.reshape(previous[n].shape) for n, k in zip(names, kept)}


def density_of(name: str, layer_density: dict[str, float] | None, default: float) -> float:
    """`prune.layer_density`'s density for a parameter (the first pattern, fnmatch, that
    names it), else `default`."""
    return next((d for p, d in (layer_density or {}).items() if fnmatchcase(name, p)), default)


def layer_counts(shapes: list[tuple[int, ...]], density: float, scope: str) -> list[int]:
    """Weights each layer keeps under a per-layer scope (every scope but `global`)."""
    if scope == "erk":
        return erk_counts(shapes, density)
    if scope == "smart_ratio":
        return smart_ratio_counts(shapes, density)
    if scope == "uniform_plus":
        return uniform_plus_counts(shapes, density)
    if scope == "layerwise":
        return [round(math.prod(s) * density) for s in shapes]
    raise ValueError(f"scope {scope!r} has no fixed per-layer counts; allowed: layerwise, erk, smart_ratio, "
                     "uniform_plus")


UNIFORM_PLUS_LAST = 0.2  # Gale et al.'s uniform+: the last layer keeps at least this share


def uniform_plus_counts(shapes: list[tuple[int, ...]], density: float) -> list[int]:
    """Gale et al. 2019's uniform+ (the `unifplus` of LAMP's code): a first layer that is a conv
    stays dense, the last layer keeps at least round(UNIFORM_PLUS_LAST · its size), and every
    other layer keeps the same share, so the total is round(N · density). Shares are rounded by
    largest remainder. A budget the dense first layer or the last layer's floor already exceeds is
    refused (ValueError), as the code's "cannot be pruned further"."""
    sizes = [math.prod(s) for s in shapes]
    total = round(sum(sizes) * density)
    if len(sizes) == 1:
        return [total]
    first = sizes[0] if len(shapes[0]) == 4 else None  # LAMP's code: only a first conv stays dense
    budget = total - (first or 0)
    if budget < 0:
        raise ValueError(f"scope uniform_plus keeps the first conv dense, {sizes[0]:,} weights, more than the "
                         f"{total:,} of density {density:.6g}")
    free = list(range(1 if first is not None else 0, len(sizes)))
    last = len(sizes) - 1
    floor = min(round(UNIFORM_PLUS_LAST * sizes[last]), sizes[last])
    share = budget / sum(sizes[i] for i in free)
    fixed: dict[int, int] = {}
    if round(share * sizes[last]) < floor and len(free) > 1:
        fixed[last] = floor
        rest = [i for i in free if i != last]
        share = (budget - floor) / sum(sizes[i] for i in rest)
        if share < 0:
            raise ValueError(f"scope uniform_plus keeps at least {floor:,} weights of the last layer, more than "
                             f"the {budget:,} of density {density:.6g} left for it and the middle layers")
    counts = [sizes[i] if i == 0 and first is not None else fixed.get(i, math.floor(share * sizes[i]))
              for i in range(len(sizes))]
    spread = [i for i in free if i not in fixed]
    by_remainder = sorted(spread, key=lambda i: (-(share * sizes[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


SMART_RATIO_LAST = 0.3  # Su et al.'s code: `linear_keep_ratio`, default 0.3, for the classifier


def smart_ratio_counts(shapes: list[tuple[int, ...]], density: float) -> list[int]:
    """Su et al. 2020's smart ratio ("random tickets"): with L layers in forward order, layer
    l < L keeps a density ∝ (L−l+1)² + (L−l+1), decaying with depth, and the classifier
    (layer L) keeps SMART_RATIO_LAST of its weights; scaled so the total is `density`.

    The reference code keeps every nn.Linear at 30 % because its nets (VGG, ResNet) have one,
    the classifier; here that applies to the last layer only, so MLPs get the decaying rule
    too. Its VGG variant also divides by l² (`arch != 'resnet'`); not done here. A layer that
    would exceed density 1 is kept dense and the rest re-solved (the reference hands the
    excess to the next layers in order; the totals agree). Largest-remainder rounding, as ERK."""
    sizes = [math.prod(s) for s in shapes]
    total = round(sum(sizes) * density)
    if len(sizes) == 1:
        return [total]
    last = min(round(sizes[-1] * SMART_RATIO_LAST), total)
    depth = len(sizes)
    raw = [(depth - l + 1) ** 2 + (depth - l + 1) for l in range(1, depth)]  # noqa: E741
    body, budget = sizes[:-1], total - last
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(body)) if i not in dense]
        rest = budget - sum(body[i] for i in dense)
        scale = rest / sum(raw[i] * body[i] for i in free) if free else 0.0
        over = {i for i in free if scale * raw[i] > 1}
        if not over:
            break
        dense |= over
    exact = [float(body[i]) if i in dense else scale * raw[i] * body[i] for i in range(len(body))]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(body)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: max(budget - sum(counts), 0)]:
        counts[i] += 1
    return [*counts, last]


def erk_counts(shapes: list[tuple[int, ...]], density: float) -> list[int]:
    """Erdős–Rényi-kernel budget (Evci et al. 2020): layer l keeps a density ∝ Σ dims / Π dims,
    scaled so the total is `density`; a layer that would exceed 1 is kept dense and the rest
    re-solved. Counts are rounded by largest remainder so they sum to round(N · density)."""
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    total = round(sum(sizes) * density)
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(sizes)) if i not in dense]
        eps = (total - sum(sizes[i] for i in dense)) / sum(raw[i] * sizes[i] for i in free)
        over = {i for i in free if eps * raw[i] > 1}
        if not over:
            break
        dense |= over
    exact = [sizes[i] if i in dense else eps * raw[i] * sizes[i] for i in range(len(sizes))]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def nm_view(t: torch.Tensor, groups: str = "rows") -> torch.Tensor:
    """`t` arranged so that its N:M groups are runs of consecutive entries in row-major order:
    itself (rows), or a conv's (out, kh, kw, in) permutation (channels: groups of input channels at
    one kernel position). `nm_unview` undoes it."""
    return t.permute(0, *range(2, t.dim()), 1) if groups == "channels" and t.dim() > 2 else t


def nm_unview(t: torch.Tensor, groups: str = "rows") -> torch.Tensor:
    return t.permute(0, t.dim() - 1, *range(1, t.dim() - 1)) if groups == "channels" and t.dim() > 2 else t


def select_nm(scores: dict[str, torch.Tensor], previous: Mask, n: int, m: int, indivisible: str = "error",
              groups: str = "rows") -> Mask:
    """N:M sparsity: in every group of `m` consecutive weights along a layer's reduction
    dimension, keep the `n` highest-scoring weights that `previous` still keeps. `groups`:
    "rows", along the rows of `weight.reshape(out, -1)` (a Linear's in_features, a Conv's
    in_channels × kh × kw in that flatten order); "channels", along a conv's input channels at
    each kernel position (NVIDIA ASP's order; a Linear's groups are the same either way).

    Ties go to the lower index within the group (a stable sort), so the same scores always
    give the same mask. A group in which `previous` already removed weights so that fewer
    than n survive keeps just its survivors (a pruned weight is never revived), so such a
    group is sparser than n:m. Every layer's group axis must be a multiple of m
    (prune_checks.check_nm refuses the spec before any compute; here it is a ValueError),
    unless `indivisible="dense"`: then such a layer keeps `previous` as it is."""
    if not 1 <= n < m:
        raise ValueError(f"N:M needs 1 <= n < m, got n={n}, m={m}")
    out: Mask = {}
    for name, alive in previous.items():
        s = scores[name].detach().cpu()
        if not torch.isfinite(s).all():
            raise ValueError(f"scores for {name} contain NaN or inf")
        if s.dim() < 2:
            raise ValueError(f"{name}: N:M groups a row's input weights, and a {s.dim()}-D parameter has none")
        s = nm_view(s, groups)
        row = s.shape[-1] if groups == "channels" else s[0].numel()
        if row % m and indivisible == "dense":
            out[name] = alive.detach().cpu().bool().clone()
            continue
        if row % m:
            raise ValueError(f"{name}: {row} input weights per {'kernel position' if groups == 'channels' else 'row'} "
                             f"is not a multiple of m={m}")
        ranked_shape = s.shape
        grouped = s.double().reshape(-1, m)
        live = nm_view(alive.detach().cpu().bool(), groups).reshape(-1, m)
        ranked = grouped.masked_fill(~live, -math.inf)  # scores are finite: dead weights rank last
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
        top = (torch.arange(m) < n).expand_as(order)
        keep = torch.zeros_like(live).scatter(1, order, top) & live
        out[name] = nm_unview(keep.reshape(ranked_shape), groups).contiguous()
    return out
