"""The stage functions: node fields + upstream artifacts → one stored artifact.

Each stage reads `node.fields` and its inputs' payloads and nothing else. `run` is the
whole caching contract, usable from a notebook with no Prefect: return the verified
stored artifact if there is one, otherwise compute, store atomically, and return it.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from pai_core import data as data_lib
from pai_core import structured
from pai_core.collapse import LayerCollapse, collapse_report, describe
from pai_core.criteria import ScoreInputs, get_criterion
from pai_core.dynamic import DynamicSparsity
from pai_core.gradual import GradualMagnitude
from pai_core.masks import Mask, apply_mask, dense_mask, density_report, prunable_names, sparsity
from pai_core.models import build_model
from pai_core.plan import Node
from pai_core.selection import select
from pai_core.supermask import Selector, signed_kaiming_constant
from pai_core.specs import TrainSpec
from pai_core.store import Ref, Store
from pai_core.training import best_val, epoch_order, evaluate, resolve_device, train

log = logging.getLogger("pai_core.stages")


@dataclass
class Runtime:
    """What a stage may use that is not part of its key: where to store, where to run."""
    store: Store
    device: str = "auto"
    computed: list[str] = field(default_factory=list)  # "stage/key" of each computation, in order

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)


@lru_cache(maxsize=4)
def _bundle(dataset: str, val_size: int, split_seed: int, device: str) -> data_lib.DataBundle:
    b = data_lib.load(dataset, val_size=val_size, split_seed=split_seed)
    if device == "cpu":
        return b
    move = lambda s: data_lib.Split(s.x.to(device), s.y.to(device))  # noqa: E731
    return data_lib.DataBundle(b.name, move(b.train), move(b.val), move(b.test), b.in_shape, b.num_classes)


def bundle_for(fields: Mapping[str, Any], rt: Runtime) -> data_lib.DataBundle:
    return _bundle(fields["dataset"], fields["val_size"], fields["split_seed"], str(rt.torch_device))


def model_from(ref: Ref, payload: dict[str, Any], rt: Runtime) -> nn.Module:
    arch = ref.info["arch"]
    model = build_model(arch["model"]["name"], tuple(arch["in_shape"]), arch["num_classes"], seed=0)
    model.load_state_dict(payload["model"])
    return model.to(rt.torch_device)


# ------------------------------------------------------------------ the stages

def init_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, dict]:
    f = node.fields
    model = build_model(f["model"]["name"], tuple(f["in_shape"]), f["num_classes"], seed=f["seed"])
    return {"model": model.state_dict()}, {"arch": {k: f[k] for k in ("model", "in_shape", "num_classes")},
                                           "iteration": 0}


def train_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, dict]:
    f, start = node.fields, inputs["start"]
    payload = rt.store.load(start)
    model = model_from(start, payload, rt)
    mask = rt.store.load(inputs["mask"])["mask"] if "mask" in inputs else None
    resume = f["mode"] == "continue"
    data, spec = bundle_for(f["data"], rt), TrainSpec(**f["train"])
    updater = _mask_updater(node, spec.total_iterations(math.ceil(len(data.train) / f["data"]["batch_size"])))
    if f.get("gradual") and mask is None:
        mask = dense_mask(model, f["gradual"]["prune_biases"])
    outcome = train(
        model, data, spec,
        batch_size=f["data"]["batch_size"], order_seed=f["data"]["order_seed"], mask=mask,
        start_iter=start.info.get("iteration", 0) if resume else 0,
        stop_iter=f["stop_iter"],
        optimizer_state=payload.get("optimizer") if resume else None,
        checkpoint=rt.store.checkpoint_path(node.stage, node.key),
        label=node.role, mask_updater=updater,
    )
    info = {"arch": start.info["arch"], "iteration": outcome.iteration, "history": outcome.history,
            "best": best_val(outcome.history)}
    payload = {"model": model.state_dict(), "optimizer": outcome.optimizer_state}
    if updater is not None:  # the mask moved: the final one is part of the result
        payload["mask"] = outcome.mask
        info["mask_updates"] = updater.updates
    if outcome.mask is not None:
        info["sparsity"] = sparsity(outcome.mask)
    return payload, info


def _mask_updater(node: Node, total: int) -> DynamicSparsity | GradualMagnitude | None:
    """The mask changes during this training: SET/RigL regrowth or a gradual ramp."""
    if d := node.fields.get("dynamic"):
        return DynamicSparsity(d["method"], d["update_interval"], d["drop_fraction"],
                               int(d["end_fraction"] * total), int(node.key[:12], 16))
    if g := node.fields.get("gradual"):
        return GradualMagnitude(g["sparsity"], int(g["start"] * total), int(g["end"] * total), g["every"],
                                g["scope"], g["min_density"])
    return None


def score_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, dict]:
    weights = inputs["weights"]
    model = model_from(weights, rt.store.load(weights), rt)
    mask = rt.store.load(inputs["mask"])["mask"] if "mask" in inputs else dense_mask(model, node.fields["prune_biases"])
    scores = _score(model, mask, node, weights.info["arch"], _generator(node), rt)
    return {"scores": scores}, {"arch": weights.info["arch"]}


def iterative_mask_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, dict]:
    """Score and prune at fixed weights, round after round: only survivors are re-scored
    (on the net masked so far) and re-ranked."""
    f, weights = node.fields, inputs["weights"]
    model = model_from(weights, rt.store.load(weights), rt)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = dense_mask(model, f["prune_biases"])
    gen, per_round, best = _generator(node), [], 0.0
    for density in f["densities"]:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n])
        scores = _score(model, mask, node, weights.info["arch"], gen, rt)
        if f.get("invert"):
            scores = {n: -v for n, v in scores.items()}
        mask = select(scores, mask, density, f["scope"], f["min_density"])
        per_round.append(sparsity(mask))
        report = _check_collapse(mask, model, tuple(weights.info["arch"]["in_shape"]), f["on_collapse"], best)
        if not report["collapsed"]:
            best = per_round[-1]
    return {"mask": mask}, {"sparsity": sparsity(mask), "layers": density_report(mask), "per_round": per_round,
                            "collapse": report, "max_sparsity_without_collapse": best}


def _check_collapse(mask: Mask, model: nn.Module, in_shape: tuple[int, ...], policy: str,
                    best: float | None) -> dict[str, Any]:
    """Diagnose the mask; refuse it (raise) or warn, as `prune.on_collapse` says."""
    report = collapse_report(model, mask, in_shape)
    if report["collapsed"]:
        msg = f"mask at sparsity {sparsity(mask):.4f} collapses the network: {describe(report)}"
        if best is not None:
            msg += f"; the highest sparsity reached without collapse was {best:.4f}"
        if policy == "error":
            raise LayerCollapse(msg + ". Lower the sparsity, set prune.min_density, or prune.on_collapse: warn")
        log.warning(msg)
    return report


def _generator(node: Node) -> torch.Generator:
    return torch.Generator().manual_seed(int(node.key[:15], 16))


def _score(model: nn.Module, mask: Mask, node: Node, arch: Mapping[str, Any], gen: torch.Generator,
           rt: Runtime) -> dict[str, torch.Tensor]:
    """The criterion's scores of the masked model; refuses a criterion that moved a weight."""
    f = node.fields
    apply_mask(model, mask)
    crit = get_criterion(f["criterion"])
    ctx = ScoreInputs(gen, tuple(arch["in_shape"]), arch["num_classes"])
    if crit.needs_data:
        ctx.batches = _first_batches(f["data"], rt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = crit.score(model, mask, ctx, crit.Params(**f["params"]))
    if any(not torch.equal(p, before[n]) for n, p in model.named_parameters()):
        raise RuntimeError(f"criterion {crit.name} changed the weights it scored")
    return {n: s.detach().cpu() for n, s in scores.items()}


def _first_batches(d: Mapping[str, Any], rt: Runtime):
    """Training batches in the order training itself would see them first (epoch 0)."""
    b = bundle_for(d, rt)
    order = epoch_order(len(b.train), d["order_seed"], 0).to(b.train.x.device)
    for i in range(0, len(order), d["batch_size"]):
        idx = order[i:i + d["batch_size"]]
        yield b.train.x[idx], b.train.y[idx]


def mask_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, dict]:
    f = node.fields
    scores: dict[str, torch.Tensor] = rt.store.load(inputs["scores"])["scores"]
    previous: Mask = (rt.store.load(inputs["previous"])["mask"] if "previous" in inputs
                      else {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()})
    if f.get("invert"):
        scores = {n: -v for n, v in scores.items()}
    arch = inputs["scores"].info["arch"]
    in_shape = tuple(arch["in_shape"])
    model = build_model(arch["model"]["name"], in_shape, arch["num_classes"], seed=0)  # the shape, not weights
    info: dict[str, Any] = {}
    if f.get("structure") == "filter":
        mask = structured.select_filters(model, scores, previous, f["density"], f["filter_norm"], f["min_density"])
        info["structured"] = structured.costs(model, mask, in_shape)
    else:
        mask = select(scores, previous, f["density"], f["scope"], f["min_density"])
    report = _check_collapse(mask, model, in_shape, f["on_collapse"], None)
    return {"mask": mask}, {"sparsity": sparsity(mask), "layers": density_report(mask), "collapse": report, **info}


def select_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, dict]:
    """Train scores over frozen weights (edge-popup / supermask); store weights, mask, scores."""
    f, init = node.fields, inputs["init"]
    sel = f["selection"]
    model = model_from(init, rt.store.load(init), rt)
    names = prunable_names(model)
    if sel["weights"] == "signed_constant":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in names:
                    p.copy_(signed_kaiming_constant(p))
    selector = Selector(model, names, sel["method"], sel["keep"], sel["evaluation"], seed=int(node.key[:12], 16))
    outcome = train(selector, bundle_for(f["data"], rt), TrainSpec(**f["train"]),
                    batch_size=f["data"]["batch_size"], order_seed=f["data"]["order_seed"],
                    checkpoint=rt.store.checkpoint_path(node.stage, node.key), label=node.role)
    state, mask = selector.result()
    scores = {n: selector.scores[str(i)].detach().cpu() for i, n in enumerate(names)}
    info = {"arch": init.info["arch"], "iteration": outcome.iteration, "history": outcome.history,
            "best": best_val(outcome.history), "sparsity": sparsity(mask)}
    return {"model": state, "mask": mask, "scores": scores}, info


def shuffle_mask_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, dict]:
    """Permute each layer's mask at random: same layer-wise densities, structure destroyed."""
    mask: Mask = rt.store.load(inputs["mask"])["mask"]
    gen = _generator(node)
    shuffled = {n: m.reshape(-1)[torch.randperm(m.numel(), generator=gen)].reshape(m.shape) for n, m in mask.items()}
    return {"mask": shuffled}, {"sparsity": sparsity(shuffled), "layers": density_report(shuffled)}


def evaluate_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, dict]:
    f, weights = node.fields, inputs["weights"]
    payload = rt.store.load(weights)
    model = model_from(weights, payload, rt)
    mask = payload.get("mask") or (rt.store.load(inputs["mask"])["mask"] if "mask" in inputs else dense_mask(model))
    apply_mask(model, mask)
    b = bundle_for(f["data"], rt)
    metrics = {f"{split}_{k}": v for split in ("val", "test") for k, v in evaluate(model, getattr(b, split)).items()}
    # Density of the weights themselves, so a mask that failed to hold would show here.
    live = {n: p.detach().ne(0).cpu() for n, p in model.named_parameters() if n in mask}
    info = {**metrics, "sparsity": sparsity(live), "layers": density_report(live),
            "best": weights.info.get("best", {}), "iteration": weights.info.get("iteration")}
    if not f.get("physical"):
        return {}, info
    # The smaller dense net itself: its own accuracy, counts and weights. Rebuild it with
    # structured.physically_prune(build_model(arch), mask) before load_state_dict.
    small = structured.physically_prune(model, mask)
    for split in ("val", "test"):
        for k, v in evaluate(small, getattr(b, split)).items():
            info[f"physical_{split}_{k}"] = v
    info["physical"] = structured.cost(small, tuple(weights.info["arch"]["in_shape"]))
    return {"model": small.state_dict()}, info


STAGES: dict[str, Callable[[Node, Mapping[str, Ref], Runtime], tuple[dict, dict]]] = {
    "init": init_stage, "train": train_stage, "score": score_stage,
    "mask": mask_stage, "iterative_mask": iterative_mask_stage, "shuffle_mask": shuffle_mask_stage,
    "select": select_stage,
    "evaluate": evaluate_stage,
}


def run(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> Ref:
    """The stored artifact for `node`, computing it only if it is absent or corrupt."""
    hit = rt.store.get(node.stage, node.key)
    if hit is not None:
        log.info("%s %s: reused", node.role, node.key)
        return hit
    log.info("%s %s: computing", node.role, node.key)
    start = time.perf_counter()
    payload, info = STAGES[node.stage](node, inputs, rt)
    info["seconds"] = round(time.perf_counter() - start, 3)  # provenance, not part of the key
    info["computed_by"] = {"host": socket.gethostname(), "pid": os.getpid(), "threads": torch.get_num_threads()}
    rt.computed.append(f"{node.stage}/{node.key}")
    provenance = {"role": node.role, "fields": node.fields, "inputs": {k: r.key for k, r in inputs.items()}}
    return rt.store.put(node.stage, node.key, payload, info, provenance)


def run_plan(nodes: list[Node], rt: Runtime) -> dict[str, Ref]:
    """Execute nodes in order with no orchestrator (notebooks, tests): key → ref."""
    refs: dict[str, Ref] = {}
    for node in nodes:
        refs[node.key] = run(node, {k: refs[n.key] for k, n in node.inputs.items()}, rt)
    return refs
