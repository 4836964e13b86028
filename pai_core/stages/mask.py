"""mask, shuffle_mask, invert_mask: masks chosen from scores, and the sanity checks' two
mask controls (Frankle et al. 2021)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from pai_core import structured
from pai_core.infos import MaskInfo
from pai_core.masks import Mask, density_report, sparsity
from pai_core.plan import Node
from pai_core.selection import select, select_nm
from pai_core.stages.common import build_arch, check_collapse, generator
from pai_core.stages.registry import Runtime, stage
from pai_core.store import Ref


@stage("mask", salt=1, info=MaskInfo)
def mask_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, MaskInfo]:
    """Keep the highest-scoring surviving weights (or whole filters, or n of every m) to the
    round's density."""
    f = node.fields
    scores: dict[str, torch.Tensor] = rt.store.load(inputs["scores"])["scores"]
    previous: Mask = (rt.store.load(inputs["previous"])["mask"] if "previous" in inputs
                      else {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()})
    if f.get("invert") and f.get("structure") != "filter":  # N:M masks: the inverted ranking (sanity checks)
        scores = {n: -v for n, v in scores.items()}
    arch = inputs["scores"].info.arch
    model = build_arch(arch)  # the shape, not the weights
    in_shape = tuple(arch.in_shape)
    costs = None
    if f.get("structure") == "filter":
        mask = structured.select_filters(model, scores, previous, f["density"], f["filter_norm"], f["min_density"],
                                         f["scope"], f.get("filter_layers", "all"), bool(f.get("invert")),
                                         f.get("ignore", ()), f.get("layer_density"))
        costs = structured.costs(model, mask, in_shape)
    elif f.get("structure") == "nm":
        mask = select_nm(scores, previous, f["n"], f["m"], f.get("nm_indivisible", "error"), f.get("nm_groups", "rows"))
    else:
        mask = select(scores, previous, f["density"], f["scope"], f["min_density"], f.get("layer_density"))
    report = check_collapse(mask, model, in_shape, f["on_collapse"], None)
    return {"mask": mask}, MaskInfo(sparsity=sparsity(mask), layers=density_report(mask), collapse=report,
                                    structured=costs)


@stage("shuffle_mask", salt=1, info=MaskInfo)
def shuffle_mask_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, MaskInfo]:
    """Permute each layer's mask at random: same layer-wise densities, structure destroyed."""
    mask: Mask = rt.store.load(inputs["mask"])["mask"]
    gen = generator(node.key)
    shuffled = {n: m.reshape(-1)[torch.randperm(m.numel(), generator=gen)].reshape(m.shape) for n, m in mask.items()}
    return {"mask": shuffled}, MaskInfo(sparsity=sparsity(shuffled), layers=density_report(shuffled))


@stage("invert_mask", salt=1, info=MaskInfo)
def invert_mask_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, MaskInfo]:
    """The inverted ranking of a whole pruning history, layer by layer, at the original's
    per-layer counts: keep the weights pruned first (lowest score in the earliest round).

    A weight pruned in round j ranks below every weight pruned later; within a round, by the
    score it had then. The original mask keeps the top of this ranking; the inverse keeps
    the bottom, so after r rounds of IMP it is not merely the last round's choice inverted."""
    r = node.fields["rounds"]
    masks = [rt.store.load(inputs[f"mask_{j}"])["mask"] for j in range(1, r + 1)]
    scores = [rt.store.load(inputs[f"scores_{j}"])["scores"] for j in range(1, r + 1)]
    inverted: Mask = {}
    for name, final in masks[-1].items():
        flat_final = final.reshape(-1)
        pruned_in = torch.full_like(flat_final, r + 1, dtype=torch.int64)  # survivors: never pruned
        score_then = scores[-1][name].reshape(-1).clone().double()
        alive = torch.ones_like(flat_final)
        for j, (m, s) in enumerate(zip(masks, scores), start=1):
            dropped = alive & ~m[name].reshape(-1)
            pruned_in[dropped] = j
            score_then[dropped] = s[name].reshape(-1)[dropped].double()
            alive = m[name].reshape(-1)
        order = torch.sort(score_then, stable=True).indices
        order = order[torch.sort(pruned_in[order], stable=True).indices]  # lexicographic: round, then score
        keep = torch.zeros_like(flat_final)
        keep[order[:int(flat_final.sum())]] = True
        inverted[name] = keep.reshape(final.shape)
    return {"mask": inverted}, MaskInfo(sparsity=sparsity(inverted), layers=density_report(inverted))
