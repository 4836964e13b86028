"""Plans: each paradigm as a small DAG of keyed stage nodes, built before anything runs;
here are the plan types and the node builders every paradigm's plan uses.

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
from pai_core.data import image_folder
from pai_core.keys import stage_key
from pai_core.models import model_info
from pai_core.specs import ExperimentBase, PruneSpec, TrainSpec

REINIT_SEED_OFFSET = 7919  # the random-reinit control draws a different, fixed init


@dataclass(frozen=True, eq=False)
class Node:
    stage: str                      # a registered stage: init | train | score | mask | evaluate ...
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
    analysis: Node | None = None  # a further result of the round (instability: the interpolated path)


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
            if r.analysis is not None:
                visit(r.analysis, groups[-1])
        return groups


# ---------------------------------------------------------------- node builders

def data_fields(spec: ExperimentBase) -> dict[str, Any]:
    """What identifies the data. An image folder adds its folder name, the fingerprint of its
    file list and the image size, never its path: machines holding the same files in
    different places share every artifact (pai_core.data.image_folder)."""
    info = spec.data.info
    val = info.default_val_size if spec.data.val_size is None else spec.data.val_size
    fields = {"dataset": spec.data.dataset, "val_size": val, "split_seed": spec.data.split_seed}
    if spec.data.dataset == image_folder.NAME:
        folder = spec.data.folder
        fields |= {"root": folder.name, "files": folder.fingerprint, "image_size": info.in_shape[-1]}
    return fields


def train_data_fields(spec: ExperimentBase, order_seed: int | None = None) -> dict[str, Any]:
    """The data as a training reads it: batches, their order and their augmentation. `order_seed`:
    another draw of that SGD noise (order, augmentation, dropout) than the spec's."""
    data = {**data_fields(spec), "batch_size": spec.data.batch_size,
            "order_seed": spec.order_seed if order_seed is None else order_seed}
    if spec.data.augment_kinds:  # only then: an unaugmented (MNIST) training keeps the key it had
        data["augment"] = list(spec.data.augment_kinds)
    for crop in ("crop_scale", "crop_ratio"):  # an image folder's crop ranges, only when set
        if getattr(spec.data, crop) is not None:
            data[crop] = list(getattr(spec.data, crop))
    return data


def init_node(spec: ExperimentBase, seed: int | None = None) -> Node:
    info = spec.data.info
    return Node("init", "init", {
        "model": spec.model.model_dump(mode="json"), "seed": spec.seed if seed is None else seed,
        "in_shape": list(info.in_shape), "num_classes": info.num_classes,
    })


def default_optimizer_state(mode: str) -> str:
    """A training continued from a stored point restores its optimizer; the others start one."""
    return "restored" if mode == "continue" else "fresh"


def train_node(spec: ExperimentBase, role: str, start: Node, train: TrainSpec, *, mask: Node | None = None,
               mode: str = "continue", stop_iter: int | None = None, order_seed: int | None = None,
               optimizer_state: str | None = None, **extra: Any) -> Node:
    """`continue` resumes start's iteration and optimizer state (LTH rewinding); `finetune` keeps
    only its weights and starts a fresh schedule (PaT); `replay` keeps its weights and replays the
    schedule from `from_iter` (LR rewinding). `optimizer_state` departs from the mode's own
    choice: "fresh" in `continue` (open_lth's rewinding: a new optimizer at step k), "restored" in
    `replay` (Renda et al.'s code keeps the momentum). `extra` fields ask the train stage for a
    callback registered under their name (pai_core.callbacks)."""
    fields = {"data": train_data_fields(spec, order_seed), "train": train.key_fields(), "mode": mode,
              "stop_iter": stop_iter, **extra}
    if optimizer_state is not None and optimizer_state != default_optimizer_state(mode):
        fields["optimizer_state"] = optimizer_state  # only then: every other training keeps its key
    inputs = {"start": start} | ({"mask": mask} if mask else {})
    return Node("train", role, fields, inputs)


def score_node(spec: ExperimentBase, weights: Node, mask: Node | None, prune: PruneSpec | None = None, *,
               density: float | None = None) -> Node:
    """`density`: the mask's, for a criterion that `chooses_count` (PHEW's walks stop at it)."""
    prune = prune or spec.prune
    crit = get_criterion(prune.criterion)
    fields: dict[str, Any] = {"criterion": crit.name, "params": crit.Params(**prune.params).model_dump(mode="json"),
                              "prune_biases": prune.prune_biases}
    if crit.chooses_count:  # only then: every other criterion's scores keep their keys
        if density is None:
            raise ValueError(f"criterion {crit.name} chooses the kept weights itself: its score needs the density")
        fields["density"] = density
    if prune.ignore:  # only when set: masks without ignored layers keep the keys they had
        fields["ignore"] = list(prune.ignore)
    # BatchNorm mode only where there is BatchNorm: BN-free models keep the keys they had.
    if crit.bn_mode and model_info(spec.model.name).has_batch_norm(spec.model.params):
        fields["bn_mode"] = prune.bn_mode or crit.bn_mode
    if crit.stochastic:
        fields["seed"] = spec.seed
    if crit.needs_data:
        fields["data"] = {**data_fields(spec), "batch_size": spec.data.batch_size, "order_seed": spec.order_seed}
    return Node("score", "score", fields, {"weights": weights} | ({"mask": mask} if mask else {}))


def mask_node(spec: ExperimentBase, scores: Node, previous: Node | None, density: float,
              structure: dict[str, Any] | None = None) -> Node:
    """`structure`: extra fields of a structured selection (PaT's whole filters). N:M
    (`prune.structure: nm`) adds its structure, n and m itself; an unstructured mask has no
    such fields, so its key is the one it always had."""
    fields = {"density": density, "scope": spec.prune.scope, "min_density": spec.prune.min_density,
              "on_collapse": spec.prune.on_collapse} | (structure or {})
    if spec.prune.layer_density:  # only when set: other masks keep their keys
        fields["layer_density"] = dict(spec.prune.layer_density)
    if getattr(spec.prune, "structure", None) == "nm":
        fields |= {"structure": "nm", "n": spec.prune.n, "m": spec.prune.m}
        if spec.prune.nm_indivisible != "error":  # what it changes enters the key; the default adds nothing
            fields["nm_indivisible"] = spec.prune.nm_indivisible
        if spec.prune.nm_groups != "rows":  # likewise
            fields["nm_groups"] = spec.prune.nm_groups
    return Node("mask", "mask", fields, {"scores": scores} | ({"previous": previous} if previous else {}))


def iterative_mask_node(spec: ExperimentBase, weights: Node, densities: list[float],
                        structure: dict[str, Any] | None = None) -> Node:
    """Score and prune repeatedly at fixed weights, keeping only the final mask: a 100-round
    schedule is one artifact, not 200. `structure`: a filter selection's fields, as mask_node's."""
    score = score_node(spec, weights, None, density=densities[-1])
    per_round = {k: v for k, v in score.fields.items() if k != "density"}  # each round scores at its own
    fields = {**per_round, "densities": densities, "scope": spec.prune.scope,
              "min_density": spec.prune.min_density, "on_collapse": spec.prune.on_collapse} | (structure or {})
    if spec.prune.layer_density:
        fields["layer_density"] = dict(spec.prune.layer_density)
    if "data" in fields:  # each round reads new batches (FORCE, iterative SNIP), as their references do
        fields["rotate_batches"] = True
    return Node("iterative_mask", "prune_at_init", fields, {"weights": weights})


def evaluate_node(spec: ExperimentBase, weights: Node, mask: Node | None, physical: bool = False) -> Node:
    fields: dict[str, Any] = {"data": data_fields(spec)}
    if mask is not None and physical:
        fields["physical"] = True  # also build and evaluate the physically smaller net
    return Node("evaluate", "evaluate", fields, {"weights": weights} | ({"mask": mask} if mask else {}))


def dense_round(spec: ExperimentBase) -> tuple[Node, Round]:
    """init -> pretrain -> evaluate: the dense baseline every paradigm with one shares."""
    init = init_node(spec)
    pretrain = train_node(spec, "pretrain", init, spec.train)
    return init, Round(0, "dense", 1.0, None, pretrain, evaluate_node(spec, pretrain, None))
