"""Plans: each paradigm as a small DAG of keyed stage nodes, built before anything runs.

A node holds the exact spec fields its stage reads and its upstream nodes; its key is
derived from those alone (keys.py). Stage code receives only `node.fields`, so a stage
cannot read a field its key does not cover. Because keys come from keys and not from
contents, a whole plan, every round of it, is known up front: `pai show` prints it, a
flow executes it, and a crashed run resumes at the first node not yet stored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pai_core.criteria import get_criterion
from pai_core.data import dataset_info
from pai_core.keys import stage_key
from pai_core.specs import ExperimentSpec, TrainSpec

REINIT_SEED_OFFSET = 7919  # the random-reinit control draws a different, fixed init


@dataclass(frozen=True, eq=False)
class Node:
    stage: str                      # init | train | score | mask | evaluate
    role: str                       # what the flow calls it: pretrain, rewind, retrain, ...
    fields: dict[str, Any]
    inputs: dict[str, Node] = field(default_factory=dict)

    @cached_property
    def key(self) -> str:
        return stage_key(self.stage, self.fields, {k: n.key for k, n in self.inputs.items()})


@dataclass
class Round:
    """One row of the results table: a mask (None = dense) and the network trained with it."""
    index: int
    name: str
    density: float
    mask: Node | None
    trained: Node
    evaluate: Node


@dataclass
class Plan:
    flow: str
    rounds: list[Round]

    @property
    def nodes(self) -> list[Node]:
        """Every node once, upstream before downstream."""
        return [n for group in self.nodes_by_round() for n in group]

    def nodes_by_round(self) -> list[list[Node]]:
        """For each round, the nodes it needs that no earlier round did, in run order."""
        seen: set[str] = set()
        groups: list[list[Node]] = []

        def visit(n: Node, out: list[Node]) -> None:
            if n.key in seen:
                return
            for dep in n.inputs.values():
                visit(dep, out)
            seen.add(n.key)
            out.append(n)

        for r in self.rounds:
            groups.append([])
            visit(r.evaluate, groups[-1])
        return groups


# ---------------------------------------------------------------- node builders

def _data_fields(spec: ExperimentSpec) -> dict[str, Any]:
    info = dataset_info(spec.data.dataset)
    val = info.default_val_size if spec.data.val_size is None else spec.data.val_size
    return {"dataset": spec.data.dataset, "val_size": val, "split_seed": spec.data.split_seed}


def init_node(spec: ExperimentSpec, seed: int | None = None) -> Node:
    info = dataset_info(spec.data.dataset)
    return Node("init", "init", {
        "model": spec.model.model_dump(mode="json"), "seed": spec.seed if seed is None else seed,
        "in_shape": list(info.in_shape), "num_classes": info.num_classes,
    })


def train_node(spec: ExperimentSpec, role: str, start: Node, train: TrainSpec, *, mask: Node | None = None,
               mode: str = "continue", stop_iter: int | None = None) -> Node:
    """`continue` resumes start's iteration and optimizer state (LTH rewinding);
    `finetune` keeps only its weights and starts a fresh schedule (PaT)."""
    fields = {
        "data": {**_data_fields(spec), "batch_size": spec.data.batch_size, "order_seed": spec.order_seed},
        "train": train.model_dump(mode="json"), "mode": mode, "stop_iter": stop_iter,
    }
    inputs = {"start": start} | ({"mask": mask} if mask else {})
    return Node("train", role, fields, inputs)


def score_node(spec: ExperimentSpec, weights: Node, mask: Node | None) -> Node:
    crit = get_criterion(spec.prune.criterion)
    fields: dict[str, Any] = {"criterion": crit.name, "params": crit.Params(**spec.prune.params).model_dump(mode="json"),
                              "prune_biases": spec.prune.prune_biases}
    if crit.stochastic:
        fields["seed"] = spec.seed
    if crit.needs_data:
        fields["data"] = {**_data_fields(spec), "batch_size": spec.data.batch_size, "order_seed": spec.order_seed}
    return Node("score", "score", fields, {"weights": weights} | ({"mask": mask} if mask else {}))


def mask_node(spec: ExperimentSpec, scores: Node, previous: Node | None, density: float) -> Node:
    fields = {"density": density, "scope": spec.prune.scope, "min_density": spec.prune.min_density,
              "on_collapse": spec.prune.on_collapse}
    if spec.prune.structure == "filter":
        fields |= {"structure": "filter", "filter_norm": spec.prune.filter_norm}
    return Node("mask", "mask", fields, {"scores": scores} | ({"previous": previous} if previous else {}))


def iterative_mask_node(spec: ExperimentSpec, weights: Node, densities: list[float]) -> Node:
    """Score and prune repeatedly at fixed weights, keeping only the final mask: a 100-round
    schedule is one artifact, not 200."""
    score = score_node(spec, weights, None)
    fields = {**score.fields, "densities": densities, "scope": spec.prune.scope,
              "min_density": spec.prune.min_density, "on_collapse": spec.prune.on_collapse}
    return Node("iterative_mask", "prune_at_init", fields, {"weights": weights})


def evaluate_node(spec: ExperimentSpec, weights: Node, mask: Node | None) -> Node:
    fields: dict[str, Any] = {"data": _data_fields(spec)}
    if mask is not None and spec.prune is not None and spec.prune.physical:
        fields["physical"] = True  # also build and evaluate the physically smaller net
    return Node("evaluate", "evaluate", fields, {"weights": weights} | ({"mask": mask} if mask else {}))


def _dense_round(spec: ExperimentSpec) -> tuple[Node, Round]:
    init = init_node(spec)
    pretrain = train_node(spec, "pretrain", init, spec.train)
    return init, Round(0, "dense", 1.0, None, pretrain, evaluate_node(spec, pretrain, None))


# ------------------------------------------------------------------- paradigms

def lottery_ticket(spec: ExperimentSpec) -> Plan:
    """IMP: train; prune p% of what is left by |w|; rewind to iteration k; retrain; repeat."""
    init, dense = _dense_round(spec)
    k = spec.prune.rewind_iter
    rewind = init if k == 0 else train_node(spec, "rewind", init, spec.train, stop_iter=k)
    rounds, weights, mask = [dense], dense.trained, None
    for r, density in enumerate(spec.prune.round_densities(), start=1):
        mask = mask_node(spec, score_node(spec, weights, mask), mask, density)
        weights = train_node(spec, "retrain", rewind, spec.retrain_spec, mask=mask)
        rounds.append(Round(r, f"round {r}", density, mask, weights, evaluate_node(spec, weights, mask)))
        if spec.prune.reinit_control:
            fresh = init_node(spec, seed=spec.seed + REINIT_SEED_OFFSET)
            ctrl = train_node(spec, "reinit", fresh, spec.retrain_spec, mask=mask)
            rounds.append(Round(r, f"round {r} reinit", density, mask, ctrl, evaluate_node(spec, ctrl, mask)))
    return Plan("lottery_ticket", rounds)


def prune_after_training(spec: ExperimentSpec) -> Plan:
    """PaT: train; prune by the criterion; fine-tune the survivors; repeat for iterative."""
    _, dense = _dense_round(spec)
    rounds, weights, mask = [dense], dense.trained, None
    if spec.prune.schedule == "gradual":  # the mask is grown inside the fine-tune itself
        p = spec.prune
        ft = train_node(spec, "finetune", weights, spec.retrain_spec, mode="finetune")
        ft = Node("train", "finetune", {**ft.fields, "gradual": {
            **p.gradual.model_dump(mode="json"), "sparsity": p.sparsity, "scope": p.scope,
            "min_density": p.min_density, "prune_biases": p.prune_biases}}, ft.inputs)
        return Plan("prune_after_training", [dense, Round(1, "gradual", 1 - p.sparsity, None, ft,
                                                          evaluate_node(spec, ft, None))])
    for r, density in enumerate(spec.prune.round_densities(), start=1):
        mask = mask_node(spec, score_node(spec, weights, mask), mask, density)
        weights = train_node(spec, "finetune", weights, spec.retrain_spec, mask=mask, mode="finetune")
        rounds.append(Round(r, f"round {r}", density, mask, weights, evaluate_node(spec, weights, mask)))
    return Plan("prune_after_training", rounds)


def prune_at_init(spec: ExperimentSpec) -> Plan:
    """SNIP, GraSP, SynFlow, random, magnitude at init: k1 = k2 = 0, f3 = train from scratch.
    One-shot scores once; iterative scores and prunes `rounds` times at the init. The dense
    round is the same node as LTH's and PaT's pretrain, so it is shared, not retrained."""
    init, dense = _dense_round(spec)
    densities = spec.prune.round_densities()
    if spec.prune.schedule == "one_shot":
        mask = mask_node(spec, score_node(spec, init, None), None, densities[-1])
    else:
        mask = iterative_mask_node(spec, init, densities)
    trained = train_node(spec, "sparse_train", init, spec.train, mask=mask)
    return Plan("prune_at_init", [dense, Round(1, spec.prune.criterion, densities[-1], mask, trained,
                                                evaluate_node(spec, trained, mask))])


def dynamic_sparse(spec: ExperimentSpec) -> Plan:
    """SET / RigL: an initial mask at init (random, ERK by default), then one training that
    moves weights between the pruned and the kept set; evaluation uses the final mask."""
    init, dense = _dense_round(spec)
    density = spec.prune.round_densities()[-1]
    start_mask = mask_node(spec, score_node(spec, init, None), None, density)
    trained = train_node(spec, "sparse_train", init, spec.train, mask=start_mask)
    trained = Node("train", "sparse_train", {**trained.fields, "dynamic": spec.dynamic.model_dump(mode="json")},
                   trained.inputs)
    return Plan("dynamic_sparse", [dense, Round(1, spec.dynamic.method, density, start_mask, trained,
                                                 evaluate_node(spec, trained, None))])


def supermask(spec: ExperimentSpec) -> Plan:
    """edge-popup / supermask: k1 = k2 = 0, f2 = f3 = identity. The mask is learned over
    frozen weights. No dense round: `train` here is the score schedule (supermasks want a
    learning rate that would wreck weight training); compare with another paradigm's."""
    init = init_node(spec)
    sel = spec.selection
    fields = {"selection": {**sel.model_dump(mode="json"), "weights": sel.frozen_weights},
              "data": {**_data_fields(spec), "batch_size": spec.data.batch_size, "order_seed": spec.order_seed},
              "train": spec.train.model_dump(mode="json")}
    select = Node("select", "select", fields, {"init": init})
    density = sel.keep if sel.method == "edge_popup" else float("nan")
    return Plan("supermask", [Round(1, sel.method, density, None, select, evaluate_node(spec, select, None))])


def sanity_checks(spec: ExperimentSpec) -> Plan:
    """One round's mask of the base paradigm beside three controls, each trained exactly as
    the original: a fresh random init under the same mask (reinit), the mask shuffled within
    each layer (same layer-wise densities), and the mask chosen from inverted scores. The
    base plan's nodes are the very nodes a standalone base run has, so they are reused."""
    base_spec = spec.model_copy(update={"flow": spec.sanity.base, "sanity": None})
    base = PLANS[spec.sanity.base](base_spec)
    pruned = [r for r in base.rounds if r.mask is not None and not r.name.endswith("reinit")]
    orig = pruned[-1] if spec.sanity.round is None else pruned[spec.sanity.round - 1]
    t = orig.trained
    rounds = [Round(orig.index, "original", orig.density, orig.mask, t, orig.evaluate)]

    def branch(name: str, mask: Node, start: Node) -> None:
        trained = Node("train", name, t.fields, {"start": start, "mask": mask})
        rounds.append(Round(orig.index, name, orig.density, mask, trained, evaluate_node(spec, trained, mask)))

    for check in spec.sanity.checks:
        if check == "reinit":
            branch("reinit", orig.mask, init_node(spec, seed=spec.seed + REINIT_SEED_OFFSET))
        elif check == "shuffle":
            branch("shuffle", Node("shuffle_mask", "shuffle", {"seed": spec.seed}, {"mask": orig.mask}),
                   t.inputs["start"])
        else:
            inverted = Node(orig.mask.stage, "invert", {**orig.mask.fields, "invert": True}, orig.mask.inputs)
            branch("invert", inverted, t.inputs["start"])
    return Plan("sanity_checks", rounds)


PLANS = {"lottery_ticket": lottery_ticket, "prune_after_training": prune_after_training,
         "prune_at_init": prune_at_init, "sanity_checks": sanity_checks, "dynamic_sparse": dynamic_sparse,
         "supermask": supermask}


def build_plan(spec: ExperimentSpec) -> Plan:
    return PLANS[spec.flow](spec)
