"""evaluate: val and test metrics of the masked network, measured on its weights."""
from __future__ import annotations

from collections.abc import Mapping

from pai_core import structured
from pai_core.infos import EvalInfo, PhysicalEval
from pai_core.masks import apply_mask, dense_mask, density_report, sparsity
from pai_core.plan import Node
from pai_core.stages.common import bundle_for, model_from
from pai_core.stages.registry import Runtime, stage
from pai_core.store import Ref
from pai_core.supermask import mean_over_masks, sample_masks
from pai_core.training import evaluate


@stage("evaluate", salt=1, info=EvalInfo)
def evaluate_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, EvalInfo]:
    """Accuracy and loss on val and test; with `physical`, also the smaller dense net's."""
    f, weights = node.fields, inputs["weights"]
    payload = rt.store.load(weights)
    model = model_from(weights, payload, rt)
    mask = payload.get("mask") or (rt.store.load(inputs["mask"])["mask"] if "mask" in inputs else dense_mask(model))
    b = bundle_for(f["data"], rt)
    if mean_of := payload.get("mean_of"):  # Zhou's supermask: mean over the reference's sampled masks
        masks = sample_masks(payload["scores"], mean_of["seed"], mean_of["samples"])
        metrics = {f"{split}_{k}": v for split in ("val", "test")
                   for k, v in mean_over_masks(model, masks, getattr(b, split)).items()}
        apply_mask(model, mask)
    else:
        apply_mask(model, mask)
        metrics = {f"{split}_{k}": v for split in ("val", "test") for k, v in evaluate(model, getattr(b, split)).items()}
    # Density of the weights themselves, so a mask that failed to hold would show here.
    live = {n: p.detach().ne(0).cpu() for n, p in model.named_parameters() if n in mask}
    info = EvalInfo(**metrics, sparsity=sparsity(live), layers=density_report(live),
                    best=getattr(weights.info, "best", None), iteration=getattr(weights.info, "iteration", None))
    if not f.get("physical"):
        return {}, info
    # The smaller dense net itself: its own accuracy, counts and weights. Rebuild it with
    # structured.physically_prune(build_model(arch), mask) before load_state_dict.
    small = structured.physically_prune(model, mask)
    physical = {f"{split}_{k}": v for split in ("val", "test") for k, v in evaluate(small, getattr(b, split)).items()}
    info.physical = PhysicalEval(**physical, cost=structured.cost(small, tuple(weights.info.arch.in_shape)))
    return {"model": small.state_dict()}, info
