"""select: a mask learned over frozen weights (edge-popup, Zhou's supermask, IteRand)."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from pai_core.data import dataset_info
from pai_core.infos import Arch, SelectInfo
from pai_core.masks import prunable_names, sparsity
from pai_core.plan import Node
from pai_core.specs import TrainSpec
from pai_core.stages.common import build_arch, bundle_for, model_from
from pai_core.stages.registry import Runtime, stage
from pai_core.store import Ref
from pai_core.iterand import IteRand, frozen_weights, redraw_seed
from pai_core.supermask import Selector
from pai_core.training import Callback, ProgressCallback, best_val, train


def fresh_draws(arch: Arch, names: list[str], kind: str, seed: int) -> Callable[[int], dict[str, torch.Tensor]]:
    """IteRand's candidates after `it` steps: the model built at `redraw_seed(seed, it)`, made
    frozen as the select stage makes its start (`kind`), so they come from the same distribution."""
    return lambda it: frozen_weights(build_arch(arch, seed=redraw_seed(seed, it)), names, kind)


@stage("select", salt=1, info=SelectInfo)
def select_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, SelectInfo]:
    """Train scores over frozen weights; store the weights, the mask and the scores. IteRand's
    weights move (its pruned ones are redrawn): the last ones are stored and evaluated, and they
    are in every checkpoint, as the Selector's state."""
    f, init = node.fields, inputs["init"]
    sel = f["selection"]
    model = model_from(init, rt.store.load(init), rt)
    names = prunable_names(model)
    if sel["weights"] == "signed_constant":
        with torch.no_grad():
            for n, w in frozen_weights(model, names, "signed_constant").items():
                model.get_parameter(n).copy_(w)
    seed = int(node.key[:12], 16)
    method = "edge_popup" if sel["method"] == "iterand" else sel["method"]
    selector = Selector(model, names, method, sel["keep"], sel["evaluation"], seed=seed,
                        **{k: sel[k] for k in ("score_init", "score_constant", "eval_samples") if k in sel})
    callbacks: list[Callback] = [ProgressCallback(rt.watcher, node.role)]
    if sel["method"] == "iterand":
        r = sel["rerandomize"]
        callbacks.append(IteRand(selector, r["every"], r["rate"], fresh_draws(init.info.arch, names, sel["weights"],
                                                                               seed), r["timing"]))
    outcome = train(selector, bundle_for(f["data"], rt), TrainSpec(**f["train"]),
                    batch_size=f["data"]["batch_size"], order_seed=f["data"]["order_seed"],
                    augment=f["data"].get("augment", ()),
                    crop_fill=dataset_info(f["data"]["dataset"]).crop_fill or 0.0,
                    checkpoint=rt.store.checkpoint_path(node.stage, node.key),
                    callbacks=callbacks)
    state, mask = selector.result()
    scores = {n: selector.scores[str(i)].detach().cpu() for i, n in enumerate(names)}
    info = SelectInfo(arch=init.info.arch, iteration=outcome.iteration, history=outcome.history,
                      best=best_val(outcome.history) or None, sparsity=sparsity(mask))
    payload = {"model": state, "mask": mask, "scores": scores}
    if sel["evaluation"] == "sampled_mean":  # evaluate re-draws the same masks from the scores
        payload["mean_of"] = {"seed": seed, "samples": sel["eval_samples"]}
    for cb in callbacks:
        payload |= cb.record()  # IteRand: `rerandomized`, each redraw's iteration and count
    return payload, info
