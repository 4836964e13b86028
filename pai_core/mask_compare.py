"""How alike are two masks, measured against chance.

Overlap alone misleads: two masks that each keep a fraction d of a layer share about d of
their kept weights even when they were drawn at random, so every number here comes with its
chance level: the expectation for two *independent, uniformly random* masks that keep the
same number of weights in every layer (Frankle et al. 2021's layer-wise shuffle is one such
mask). For one layer of n weights, A keeping a and B keeping b, |A∩B| is hypergeometric:

    E|A∩B| = μ = a·b/n        Var|A∩B| = a·b·(n−a)·(n−b) / (n²·(n−1))

and the chance Jaccard is μ / (a + b − μ). That is the Jaccard of the expected counts, not
the expected Jaccard: the two differ by about J''·Var/2, below 1e-3 of J for layers of a few
hundred weights and less for larger ones (tests/test_masks_compare.py measures it). The total
sums each layer's μ and variance (layers drawn independently at their own counts), so it is
the chance of a layer-wise shuffle, not of one global random mask. `z` = (|A∩B| − μ)/σ says
whether a ratio near 1 is more than noise. 0/0 (a layer both masks empty) is nan.

`load_round_mask` finds a round's *final* mask in the store, as `pai export` and
`pai sensitivity` do (pai_core.export_round): a mask that moved while training (SET/RigL,
gradual pruning, early-bird, supermask) is in the training payload; any other round's mask is
its mask node, which is final as soon as it is stored, so a pruning-at-init mask can be
compared before its training has finished.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pai_core.masks import Mask, prunable_names

Shapes = dict[str, tuple[int, ...]]


class MaskRefused(ValueError):
    """Masks that cannot be loaded or compared; the message is one line naming the round or layer."""


@dataclass(frozen=True)
class Overlap:
    """One layer (or the total) of a comparison of masks A and B.

    `overlap_a` = |A∩B|/|A|: the fraction of A's kept weights that B keeps too (1 when A ⊆ B);
    `chance_*` the same numbers for independent random masks of these per-layer counts;
    `ratio` = jaccard / chance_jaccard."""
    layer: str
    size: int
    kept_a: int
    kept_b: int
    both: int
    density_a: float
    density_b: float
    jaccard: float
    overlap_a: float
    overlap_b: float
    chance_both: float
    chance_jaccard: float
    chance_overlap_a: float
    chance_overlap_b: float
    ratio: float
    z: float


@dataclass(frozen=True)
class Comparison:
    layers: list[Overlap]
    total: Overlap


@dataclass(frozen=True)
class Matrix:
    """Pairwise totals of several masks: `jaccard[i][j]`, its chance level, and every pair's full
    Comparison (`pairs[(i, j)]`, i ≤ j) for tables and CSVs."""
    jaccard: list[list[float]]
    chance: list[list[float]]
    pairs: dict[tuple[int, int], Comparison] = field(repr=False)


def _div(x: float, y: float) -> float:
    return x / y if y else math.nan


def _overlap(layer: str, n: int, a: int, b: int, both: int, mu: float, var: float) -> Overlap:
    chance_j = _div(mu, a + b - mu)
    jaccard = _div(both, a + b - both)
    return Overlap(layer, n, a, b, both, _div(a, n), _div(b, n), jaccard, _div(both, a), _div(both, b),
                   mu, chance_j, _div(mu, a), _div(mu, b), _div(jaccard, chance_j),
                   (both - mu) / math.sqrt(var) if var > 0 else math.nan)


def check_same_layers(a: Shapes, b: Shapes, names: tuple[str, str] = ("A", "B")) -> None:
    """Refuse masks of different parameter sets, naming the first layer (A's order, then B's)
    that differs; `names` are what the message calls the two masks."""
    na, nb = names
    for name, shape in a.items():
        if name not in b:
            raise MaskRefused(f"masks of different models: layer {name!r} {list(shape)} is in {na}, not in {nb}")
        if tuple(b[name]) != tuple(shape):
            raise MaskRefused(f"masks of different models: layer {name!r} is {list(shape)} in {na}, "
                              f"{list(b[name])} in {nb}")
    for name, shape in b.items():
        if name not in a:
            raise MaskRefused(f"masks of different models: layer {name!r} {list(shape)} is in {nb}, not in {na}")


def compare(a: Mask, b: Mask) -> Comparison:
    """Per layer (A's order) and in total: densities, kept-in-both, Jaccard, overlaps and their chance levels."""
    check_same_layers({n: tuple(m.shape) for n, m in a.items()}, {n: tuple(m.shape) for n, m in b.items()})
    rows, sums = [], [0, 0, 0, 0, 0.0, 0.0]
    for name, ma in a.items():
        ma, mb = ma.bool(), b[name].bool().to(ma.device)
        n, ka, kb, both = ma.numel(), int(ma.sum()), int(mb.sum()), int((ma & mb).sum())
        mu = ka * kb / n if n else 0.0
        var = ka * kb * (n - ka) * (n - kb) / (n * n * (n - 1)) if n > 1 else 0.0
        rows.append(_overlap(name, n, ka, kb, both, mu, var))
        sums = [s + x for s, x in zip(sums, (n, ka, kb, both, mu, var), strict=True)]
    n, ka, kb, both, mu, var = sums
    return Comparison(rows, _overlap("total", n, ka, kb, both, mu, var))


def matrix(masks: Sequence[Mask]) -> Matrix:
    """Total Jaccard (and its chance level) of every pair; the diagonal compares a mask with itself."""
    k = len(masks)
    pairs = {(i, j): compare(masks[i], masks[j]) for i in range(k) for j in range(i, k)}
    jac = [[pairs[min(i, j), max(i, j)].total.jaccard for j in range(k)] for i in range(k)]
    chance = [[pairs[min(i, j), max(i, j)].total.chance_jaccard for j in range(k)] for i in range(k)]
    return Matrix(jac, chance, pairs)


# --------------------------------------------------------------------- masks from the store


@dataclass(frozen=True)
class RoundMask:
    """A round's final mask: every prunable weight of the model (a layer the spec leaves dense,
    `prune.ignore`, is all ones) plus any other parameter the round masks (biases)."""
    spec_name: str
    index: int                  # the round's row in `pai results` (0 = the first)
    name: str                   # the round's name ('round 2', 'snip', ...)
    mask: Mask
    shapes: Shapes              # every parameter of the model: aligns masks of specs that mask biases or not
    source: str                 # where the mask came from: "mask node" or "training payload"
    trained: bool               # whether the round's training is stored (finished)
    key: dict[str, str]         # stage and key of the artifact the mask was read from

    @property
    def density(self) -> float:
        """Kept / total over every masked parameter (a layer left dense counts, all kept)."""
        return sum(int(m.sum()) for m in self.mask.values()) / max(sum(m.numel() for m in self.mask.values()), 1)


def resolve(plan: Any, round_: int | str | None) -> tuple[int, Any]:
    """export_round.resolve_round, plus 'round-2' / 'round_2' for 'round 2' (no shell quoting)."""
    from pai_core.export import ExportRefused
    from pai_core.export_round import resolve_round

    names = {r.name for r in plan.rounds}
    if isinstance(round_, str) and round_ not in names and (alt := round_.replace("-", " ").replace("_", " ")) in names:
        round_ = alt
    try:
        return resolve_round(plan, round_)
    except ExportRefused as e:
        raise MaskRefused(str(e)) from None


def model_shapes(spec: Any) -> Shapes:
    """Every parameter's shape, from the spec's network on the meta device (no compute)."""
    from pai_core.prune_checks import meta_model

    return {n: tuple(p.shape) for n, p in meta_model(spec).named_parameters()}


def prunable_shapes(spec: Any) -> Shapes:
    """The Conv/Linear weights: what every mask of this spec covers, once ignored layers are filled."""
    from pai_core.prune_checks import meta_model

    model = meta_model(spec)
    params = dict(model.named_parameters())
    return {n: tuple(params[n].shape) for n in prunable_names(model)}


def _moves_mask(node: Any) -> bool:
    """Whether a training node changes its mask (the train stage's own rule: a field naming a
    registered callback, pai_core.callbacks.callbacks_for), so its final mask is in its payload."""
    from pai_core.callbacks import asks_for_callbacks

    return node.stage != "train" or asks_for_callbacks(node.fields)


def load_round_mask(spec: Any, round_: int | str | None = None, store: Any = None) -> RoundMask:
    """The final mask of a round of `spec` (None = the last round) from the verified store.

    MaskRefused, naming the round, for a round that is not in the plan, is dense, or whose final
    mask is not stored yet (a moving mask needs its training finished)."""
    from pai_core.paradigms import build_plan
    from pai_core.paths import pai_home
    from pai_core.store import Store

    store = store if store is not None else Store(pai_home() / "store")
    plan = build_plan(spec)
    index, rnd = resolve(plan, round_)
    pruned = ", ".join(f"{i} {r.name!r}" for i, r in enumerate(plan.rounds) if r.mask is not None or r.density < 1)
    if rnd.mask is None and rnd.density >= 1:
        raise MaskRefused(f"round {rnd.name!r} of {spec.name} is dense (no mask); pruned rounds: {pruned or 'none'}")
    trained = store.get(rnd.trained.stage, rnd.trained.key)
    static = rnd.mask is not None and not _moves_mask(rnd.trained)  # final once its mask node is stored
    mask, source, node = None, "", None
    if trained is not None and (payload_mask := store.load(trained).get("mask")) is not None:
        mask, source, node = payload_mask, "training payload", rnd.trained
    elif rnd.mask is not None and (trained is not None or static):
        if (ref := store.get(rnd.mask.stage, rnd.mask.key)) is not None:
            mask, source, node = store.load(ref)["mask"], "mask node", rnd.mask
    elif trained is not None:  # trained, and no mask anywhere: a dense round after all
        raise MaskRefused(f"round {rnd.name!r} of {spec.name} is dense (no mask); pruned rounds: {pruned}")
    if mask is None:
        need = rnd.mask if rnd.mask is not None and (trained is not None or static) else rnd.trained
        raise MaskRefused(f"round {rnd.name!r} of {spec.name} is not stored yet ({need.stage} {need.key[:12]}); "
                          "run it first with `pai run`")
    shapes = model_shapes(spec)
    full = {n: torch.ones(s, dtype=torch.bool) for n, s in prunable_shapes(spec).items()}
    full |= {n: m.detach().bool().cpu() for n, m in mask.items()}
    return RoundMask(spec.name, index, rnd.name, full, shapes, source, trained is not None,
                     {"stage": node.stage, "key": node.key})


def align(rounds: Sequence[RoundMask]) -> list[Mask]:
    """The rounds' masks over one parameter set: a parameter one round masks (a bias, with
    `prune_biases`) and another leaves dense is all ones in the other, if its model has it.
    Layers of different models stay as they are, for `compare` to refuse by name."""
    names = list(dict.fromkeys(n for r in rounds for n in r.mask))
    out = []
    for r in rounds:
        extra = {n: torch.ones(r.shapes[n], dtype=torch.bool) for n in names if n not in r.mask and n in r.shapes}
        out.append({**r.mask, **extra} if extra else dict(r.mask))
    return out
