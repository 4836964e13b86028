"""score and iterative_mask: a criterion's scores of the (masked) weights, once or round
after round at fixed weights."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from pai_core import structured
from pai_core.criteria import ScoreInputs, get_criterion
from pai_core.infos import Arch, MaskInfo, ScoreInfo
from pai_core.masks import Mask, apply_mask, dense_mask, density_report, sparsity
from pai_core.plan import Node
from pai_core.selection import select
from pai_core.stages.common import batch_stream, build_arch, check_collapse, first_batches, generator, model_from
from pai_core.stages.registry import Runtime, stage
from pai_core.store import Ref


@stage("score", salt=2, info=ScoreInfo)  # 2: the score artifact records the architecture
def score_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, ScoreInfo]:
    """One score per prunable weight (higher = keep)."""
    weights = inputs["weights"]
    model = model_from(weights, rt.store.load(weights), rt)
    f = node.fields
    mask = (rt.store.load(inputs["mask"])["mask"] if "mask" in inputs
            else dense_mask(model, f["prune_biases"], f.get("ignore", ())))
    scores = score(model, mask, node, weights.info.arch, generator(node.key), rt)
    return {"scores": scores}, ScoreInfo(arch=weights.info.arch)


@stage("iterative_mask", salt=1, info=MaskInfo)
def iterative_mask_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, MaskInfo]:
    """Score and prune at fixed weights, round after round, each round on the net masked so
    far. Only survivors are ranked, unless the criterion `revives` pruned weights (FORCE):
    then every weight is ranked again. With `rotate_batches`, each round reads the training
    batches after those the previous rounds read (FORCE and iterative SNIP draw a new batch
    per round), else every round reads the first ones."""
    f, weights = node.fields, inputs["weights"]
    model = model_from(weights, rt.store.load(weights), rt)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = dense_mask(model, f["prune_biases"], f.get("ignore", ()))
    everything = dict(mask)
    revives = get_criterion(f["criterion"]).revives
    stream = batch_stream(f["data"], rt) if f.get("rotate_batches") else None
    gen, per_round, best = generator(node.key), [], 0.0
    for density in f["densities"]:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n])
        scores = score(model, mask, node, weights.info.arch, gen, rt, batches=stream, density=density)
        ranked = everything if revives else mask
        if f.get("structure") == "filter":  # whole channel groups, inverted by their norms (sanity checks)
            mask = structured.select_filters(model, scores, ranked, density, f["filter_norm"], f["min_density"],
                                             f["scope"], f.get("filter_layers", "all"), bool(f.get("invert")),
                                             f.get("ignore", ()), f.get("layer_density"))
        else:
            if f.get("invert"):
                scores = {n: -v for n, v in scores.items()}
            mask = select(scores, ranked, density, f["scope"], f["min_density"], f.get("layer_density"))
        per_round.append(sparsity(mask))
        report = check_collapse(mask, model, tuple(weights.info.arch.in_shape), f["on_collapse"], best)
        if not report["collapsed"]:
            best = per_round[-1]
    in_shape = tuple(weights.info.arch.in_shape)
    costs = structured.costs(model, mask, in_shape) if f.get("structure") == "filter" else None
    return {"mask": mask}, MaskInfo(sparsity=sparsity(mask), layers=density_report(mask), per_round=per_round,
                                    collapse=report, max_sparsity_without_collapse=best, structured=costs)


@contextmanager
def scoring_mode(model: nn.Module, bn_mode: str | None) -> Iterator[None]:
    """Score in the criterion's BatchNorm mode and leave the running statistics exactly as
    they were: a train-mode forward pass would otherwise update them (sparseml #756)."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    was = model.training
    model.train(bn_mode != "eval")
    try:
        yield
    finally:
        model.train(was)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])


def score(model: nn.Module, mask: Mask, node: Node, arch: Arch, gen: torch.Generator,
          rt: Runtime, batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None,
          density: float | None = None) -> dict[str, torch.Tensor]:
    """The criterion's scores of the masked model; refuses a criterion that moved a weight.
    `batches`: where the criterion's data comes from (default: the first training batches);
    `density`: the round's, for a criterion that `chooses_count` (default: the node's)."""
    f = node.fields
    crit = get_criterion(f["criterion"])
    ctx = ScoreInputs(gen, tuple(arch.in_shape), arch.num_classes, rebuild=lambda seed: build_arch(arch, seed))
    if crit.chooses_count:  # the global selection's count (selection.select): of every entry, pruned or not
        ctx.keep = round(sum(m.numel() for m in mask.values()) * (density if density is not None else f["density"]))
    if crit.revives:
        ctx.dense_weights = {n: p.detach().clone() for n, p in model.named_parameters() if n in mask}
    apply_mask(model, mask)
    if crit.needs_data:
        ctx.batches = batches if batches is not None else first_batches(f["data"], rt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Without BN the mode changes nothing, so BN-free models keep their keys (no bn_mode field).
    with scoring_mode(model, f.get("bn_mode", "train")):
        scores = crit.score(model, mask, ctx, crit.Params(**f["params"]))
    if any(not torch.equal(p, before[n]) for n, p in model.named_parameters()):
        raise RuntimeError(f"criterion {crit.name} changed the weights it scored")
    return {n: s.detach().cpu() for n, s in scores.items()}
