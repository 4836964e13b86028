"""Schedule checks that need the network's layer sizes, done on the meta device (no memory,
no time) while the spec validates, so a schedule that cannot work is refused before the
dense training it would otherwise follow:

- collapse by arithmetic: with global scope, a round that keeps fewer weights than there
  are prunable layers must empty one; with layerwise or ERK scope, a layer whose own count
  rounds to 0 is emptied (`on_collapse: error` would stop the run after pretraining);
- an unreachable target: per-layer floors (`min_density`) that together keep more than the
  schedule's final density allows, so the network would be trained denser than the
  sparsity the spec reports.

The exact rounding is selection.py's: round(n · density) kept, ceil(min_density · n) floors,
ERK counts by largest remainder.

N:M (`structure: nm`) keeps n of every m weights of each row, so no layer can be emptied; what
can fail is the grouping itself: a layer whose row (the GEMM reduction size: in_features, or
in_channels × kh × kw) is not a multiple of m is refused, naming it.
"""
from __future__ import annotations

import math
from functools import lru_cache
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from pai_core.masks import is_ignored, prunable_names
from pai_core.models import model_info
from pai_core.selection import density_of, layer_counts

Layers = list[tuple[str, tuple[int, ...]]]  # (name, shape) of each unit the densities apply to


@lru_cache(maxsize=64)
def _meta(model: str, params: tuple[tuple[str, Any], ...], in_shape: tuple[int, ...], classes: int) -> nn.Module:
    import torch

    info = model_info(model)
    with torch.device("meta"):
        return info.construct(tuple(in_shape), classes, dict(params))


def meta_model(spec: Any) -> nn.Module:
    """The spec's network built on the meta device (cached: a sweep validates it many times)."""
    info = spec.data.info  # an image folder's shape and classes come from the folder
    params = tuple(sorted(spec.model.params.items()))
    return _meta(spec.model.name, params, tuple(info.in_shape), info.num_classes)


def weight_layers(spec: Any, biases: bool = False, ignore: Sequence[str] = ()) -> Layers:
    """Shapes of the prunable parameters (Conv/Linear weights, and biases if asked), less the
    ignored ones."""
    model = meta_model(spec)
    params = dict(model.named_parameters())
    return [(n, tuple(params[n].shape)) for n in prunable_names(model, biases) if not is_ignored(n, ignore)]


def check_ignore(spec: Any, ignore: Sequence[str], biases: bool) -> None:
    """Every `prune.ignore` pattern names a prunable parameter of this net, and something is
    left to prune: a typo would otherwise silently prune the layer it meant to keep."""
    names = prunable_names(meta_model(spec), biases)
    for pattern in ignore:
        if not any(is_ignored(n, [pattern]) for n in names):
            raise ValueError(f"prune.ignore: {pattern!r} matches no prunable parameter of {spec.model.name}; "
                             f"allowed: {', '.join(names)} (or fnmatch patterns over them)")
    if all(is_ignored(n, ignore) for n in names):
        raise ValueError(f"prune.ignore: every prunable parameter of {spec.model.name} is ignored; leave one to prune")


def check_layer_density(spec: Any, prune: Any) -> None:
    """Every `prune.layer_density` pattern names a pruned unit (a prunable parameter; with
    structure filter, a family's first layer), none an ignored one, and none empties it."""
    if prune.structure == "filter":
        units = [(f"{family}.weight", n) for family, n in prune.filter_units(spec)]
    else:
        units = [(name, math.prod(shape)) for name, shape in weight_layers(spec, prune.prune_biases, prune.ignore)]
    what = "filter family's first layer" if prune.structure == "filter" else "pruned parameter"
    for pattern, density in prune.layer_density.items():
        named = [(n, size) for n, size in units if fnmatchcase(n, pattern)]
        if not named:
            allowed = ", ".join(n for n, _ in units)
            raise ValueError(f"prune.layer_density: {pattern!r} names no {what} of {spec.model.name}; allowed: "
                             f"{allowed} (or fnmatch patterns over them; ignored layers are not pruned)")
        for name, size in named:
            if density_of(name, prune.layer_density, 1.0) == density and round(size * density) < 1:
                raise ValueError(f"prune.layer_density: {pattern!r} keeps 0 of the {size:,} units of {name} "
                                 f"(density {_fmt(density)}), so that layer would be empty")


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _what(prune: Any, r: int) -> str:
    """The field to name for round `r`'s problem: rounds when the rate alone is fine in round 1."""
    if prune.sparsity is not None:
        return "prune.sparsity"
    return "prune.rounds" if r > 1 else "prune.rate"


def _counts(layers: Layers, density: float, scope: str, field: str) -> list[int]:
    """The per-layer counts of `scope`; a scope that cannot reach `density` is refused naming `field`."""
    try:
        return layer_counts([s for _, s in layers], density, scope)
    except ValueError as e:
        raise ValueError(f"{field}: {e}; allowed: a lower sparsity, or another scope") from None


def nm_row(shape: tuple[int, ...], groups: str = "rows") -> int:
    """The length of the axis N:M groups run along: `weight.reshape(out, -1)`'s row (rows), or the
    input channels (channels: groups at one kernel position)."""
    return shape[1] if groups == "channels" else math.prod(shape[1:])


def check_nm(n: int, m: int, layers: Layers, indivisible: str = "error", groups: str = "rows") -> None:
    """Refuse (one line naming prune.m) a layer whose row is not a multiple of m, or a 1-D parameter;
    with `indivisible: dense` such layers stay dense, as long as one layer can be N:M."""
    rows = [(name, nm_row(shape, groups)) for name, shape in layers]
    for name, shape in layers:
        if len(shape) < 2:
            raise ValueError(f"prune.structure: nm groups the input weights of a row, and {name} has none "
                             f"(shape {tuple(shape)})")
    bad = [(name, row) for name, row in rows if row % m]
    if bad and indivisible == "dense":
        if len(bad) == len(rows):
            raise ValueError(f"prune.m: no layer's row is a multiple of m={m} (e.g. {bad[0][0]}: {bad[0][1]:,}), so "
                             "nothing would be N:M")
        return
    if bad:
        name, row = bad[0]
        g = math.gcd(*(r for _, r in rows))
        fits = [d for d in range(max(n + 1, 2), min(g, 64) + 1) if g % d == 0]
        allowed = ", ".join(map(str, fits)) if fits else f"none (the rows' greatest common divisor is {g})"
        what = ("input channels (in_features for a Linear; prune.nm_groups: channels)" if groups == "channels"
                else "input weights per row (in_features, or in_channels × kernel)")
        raise ValueError(f"prune.m: {name} has {row:,} {what}, not a multiple of m={m}; allowed m for n={n} here: "
                         f"{allowed}; or prune.nm_indivisible: dense leaves such layers dense")


def check_schedule(prune: Any, layers: Layers, scope: str, what: str = "weights") -> None:
    """Raise ValueError (one line, naming the field) when `prune`'s densities cannot work on
    `layers` with `scope`; `what` names the units (weights, filters)."""
    if not layers:
        return
    if getattr(prune, "structure", None) == "nm":
        check_nm(prune.n, prune.m, layers, getattr(prune, "nm_indivisible", "error"),
                 getattr(prune, "nm_groups", "rows"))
        return
    densities = prune.round_densities()
    sizes = [math.prod(s) for _, s in layers]
    total, n_layers = sum(sizes), len(layers)
    final = densities[-1]
    floors = [math.ceil(prune.min_density * n) for n in sizes]
    if prune.min_density > 0:
        if scope == "global":
            target = round(total * final)
            if sum(floors) > target:
                raise ValueError(
                    f"prune.min_density: floors of {_fmt(prune.min_density)} per layer keep {sum(floors):,} "
                    f"{what}, more than the {target:,} of the final density {_fmt(final)}, so sparsity "
                    f"{_fmt(1 - final)} is unreachable; allowed: a floor below the final density")
        else:
            counts = _counts(layers, final, scope, _what(prune, len(densities)))
            for (name, _), floor, count, n in zip(layers, floors, counts, sizes):
                if floor > count:
                    raise ValueError(
                        f"prune.min_density: the floor of {_fmt(prune.min_density)} keeps {floor:,} of the {n:,} "
                        f"{what} of {name}, more than the {count:,} that scope {scope} gives it at the final "
                        f"density {_fmt(final)}, so sparsity {_fmt(1 - final)} is unreachable; allowed: a "
                        f"floor below that layer's density")
    for r, d in enumerate(densities, start=1):
        at = f"round {r} of {len(densities)}" if len(densities) > 1 else "the mask"
        hint = (f"; at most {r - 1} rounds at rate {_fmt(prune.per_round_rate)}"
                if _what(prune, r) == "prune.rounds" else "")
        if scope == "global":
            kept = round(total * d)
            if kept < n_layers:
                raise ValueError(
                    f"{_what(prune, r)}: {at} keeps {kept:,} of the {total:,} prunable {what} (density "
                    f"{_fmt(d)}), fewer than one per prunable layer ({n_layers}), so a layer would be empty{hint}")
            continue
        for (name, _), count, n in zip(layers, _counts(layers, d, scope, _what(prune, r)), sizes):
            if count < 1 and math.ceil(prune.min_density * n) < 1:
                raise ValueError(
                    f"{_what(prune, r)}: {at} keeps 0 of the {n:,} {what} of {name} (scope {scope}, density "
                    f"{_fmt(d)}), so that layer would be empty{hint}")
