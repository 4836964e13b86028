"""select: a mask learned over frozen weights (edge-popup, Zhou's supermask)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from pai_core.data import dataset_info
from pai_core.infos import SelectInfo
from pai_core.masks import prunable_names, sparsity
from pai_core.plan import Node
from pai_core.specs import TrainSpec
from pai_core.stages.common import bundle_for, model_from
from pai_core.stages.registry import Runtime, stage
from pai_core.store import Ref
from pai_core.supermask import Selector, signed_kaiming_constant
from pai_core.training import ProgressCallback, best_val, train


@stage("select", salt=1, info=SelectInfo)
def select_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, SelectInfo]:
    """Train scores over frozen weights; store the weights, the mask and the scores."""
    f, init = node.fields, inputs["init"]
    sel = f["selection"]
    model = model_from(init, rt.store.load(init), rt)
    names = prunable_names(model)
    if sel["weights"] == "signed_constant":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in names:
                    p.copy_(signed_kaiming_constant(p))
    seed = int(node.key[:12], 16)
    selector = Selector(model, names, sel["method"], sel["keep"], sel["evaluation"], seed=seed,
                        **{k: sel[k] for k in ("score_init", "score_constant", "eval_samples") if k in sel})
    outcome = train(selector, bundle_for(f["data"], rt), TrainSpec(**f["train"]),
                    batch_size=f["data"]["batch_size"], order_seed=f["data"]["order_seed"],
                    augment=f["data"].get("augment", ()),
                    crop_fill=dataset_info(f["data"]["dataset"]).crop_fill or 0.0,
                    checkpoint=rt.store.checkpoint_path(node.stage, node.key),
                    callbacks=[ProgressCallback(rt.watcher, node.role)])
    state, mask = selector.result()
    scores = {n: selector.scores[str(i)].detach().cpu() for i, n in enumerate(names)}
    info = SelectInfo(arch=init.info.arch, iteration=outcome.iteration, history=outcome.history,
                      best=best_val(outcome.history) or None, sparsity=sparsity(mask))
    payload = {"model": state, "mask": mask, "scores": scores}
    if sel["evaluation"] == "sampled_mean":  # evaluate re-draws the same masks from the scores
        payload["mean_of"] = {"seed": seed, "samples": sel["eval_samples"]}
    return payload, info
