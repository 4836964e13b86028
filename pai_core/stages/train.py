"""train: every training of every paradigm, one stage. What differs is in the node's fields:
where it starts (`mode`), where it stops, its mask, and the callbacks it asks for."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pai_core import structured
from pai_core.budget import scratch_b
from pai_core.callbacks import callbacks_for
from pai_core.data import dataset_info
from pai_core.infos import TrainInfo
from pai_core.masks import dense_mask, sparsity
from pai_core.plan import Node, default_optimizer_state
from pai_core.specs import TrainSpec
from pai_core.stages.common import bundle_for, model_from
from pai_core.stages.registry import Runtime, stage
from pai_core.store import Ref
from pai_core.training import Callback, ProgressCallback, TrainState, best_val, train


class SlimmingL1(Callback):
    """`train.bn_l1`: network slimming's L1 on the BatchNorm scales, λ·sign(γ) added to their
    gradients after backward, before the step (Liu et al. 2017's `updateBN`). It moves no mask,
    so it is not among the callbacks that make the train stage store one."""

    def __init__(self, lam: float):
        self.lam = lam

    def after_backward(self, state: TrainState) -> None:
        structured.bn_l1_subgradient(state.model, self.lam)


@stage("train", salt=1, info=TrainInfo)
def train_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, TrainInfo]:
    """Train from `start`, masked by `mask` if given.

    Modes: `continue` resumes start's iteration and optimizer state (LTH rewinding);
    `finetune` keeps only its weights and runs a fresh schedule (PaT); `replay` keeps its
    weights and replays the schedule from iteration `from_iter` with a fresh optimizer
    (Renda et al.'s learning-rate rewinding). `optimizer_state` overrides the mode's choice."""
    f, start = node.fields, inputs["start"]
    payload = rt.store.load(start)
    model = model_from(start, payload, rt)
    mask = rt.store.load(inputs["mask"])["mask"] if "mask" in inputs else None
    data, spec = bundle_for(f["data"], rt), TrainSpec(**f["train"])
    ipe = math.ceil(len(data.train) / f["data"]["batch_size"])
    budget = None
    if "budget" in f:  # Scratch-B: the dense training's FLOPs, not its epochs (pai_core/budget.py)
        spec, budget = scratch_b(spec, ipe, model, mask, tuple(start.info.arch.in_shape), f["budget"].get("cap"))
    total = spec.total_iterations(ipe)
    callbacks = callbacks_for(f, total, node.key)
    if callbacks and mask is None:  # a callback that moves the mask starts from the dense one
        g = f.get("gradual") or f.get("early_bird") or {}
        mask = dense_mask(model, bool(g.get("prune_biases")), g.get("ignore", ()))
    restored = f.get("optimizer_state", default_optimizer_state(f["mode"])) == "restored"
    start_iter = {"continue": start.info.iteration, "finetune": 0, "replay": f.get("from_iter", 0)}[f["mode"]]
    outcome = train(
        model, data, spec,
        batch_size=f["data"]["batch_size"], order_seed=f["data"]["order_seed"], mask=mask,
        start_iter=start_iter, stop_iter=f["stop_iter"],
        optimizer_state=payload.get("optimizer") if restored else None,
        checkpoint=rt.store.checkpoint_path(node.stage, node.key),
        callbacks=[*callbacks, *([SlimmingL1(spec.bn_l1)] if spec.bn_l1 else []),
                   ProgressCallback(rt.watcher, node.role)],
        augment=f["data"].get("augment", ()), crop_fill=dataset_info(f["data"]["dataset"]).crop_fill or 0.0,
    )
    record: dict[str, Any] = {}
    for cb in callbacks:
        record |= cb.record()
    out: dict[str, Any] = {"model": model.state_dict(), "optimizer": outcome.optimizer_state}
    if callbacks:  # the mask may have moved: the final one is part of the result
        out["mask"] = outcome.mask
    info = TrainInfo(arch=start.info.arch, iteration=outcome.iteration, history=outcome.history,
                     best=best_val(outcome.history) or None,
                     sparsity=sparsity(outcome.mask) if outcome.mask is not None else None,
                     **record, **({"budget": budget} if budget else {}))
    return out, info
