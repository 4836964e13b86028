"""Instability analysis (Frankle, Dziugaite, Roy & Carbin, ICML 2020, "Linear mode connectivity
and the lottery ticket hypothesis"): is a network, at iteration k of its training, stable to
SGD noise? Two copies continue from w_k under different noise (data order, augmentation,
dropout: the order seed); the instability is how far the test error rises on the straight line
between their final weights above the mean of their own (pai_core.interpolation).

With a `prune` section the same is asked of IMP's subnetworks: IMP with rewinding to k (the
`lottery_ticket` flow with `prune.rewind_iter: k`), each round's mask applied to w_k, both
copies trained with it. The paper's finding: IMP's subnetworks reach the dense accuracy only
where they are stable, which for deeper nets needs k > 0 (late rewinding).

Every training here is one LTH would run. The first copy of each row *is* LTH's node: the
dense net's is the pretraining itself (it passes through w_k with the spec's own noise, and a
training continued from w_k replays it bit for bit), a round's is LTH's retraining from w_k. So
an instability run on top of LTH runs with rewind points k trains only the second copies, and
evaluates the paths. With `instability.rewind_optimizer: fresh` (open_lth: a new optimizer at
step k) the dense row's first copy is a training of its own, as the pretraining kept its
momentum past k; the rounds' first copies are then LTH's retrainings with that same option.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from pai_core.models import model_info
from pai_core.paradigms.common import (REWIND_OPTIMIZER, nm_tag, rewind_fits, rewind_optimizer_field, rewind_state,
                                       same_optimizer)
from pai_core.paradigms.filters import FilterPrune
from pai_core.paradigms.registry import register_paradigm
from pai_core.plan import (Node, Plan, Round, data_fields, dense_round, evaluate_node, mask_node, score_node,
                           train_data_fields, train_node)
from pai_core.spec_sections import Frozen, Seed
from pai_core.specs import ExperimentBase, TrainSpec, schedule_help

NOISE_SEED_OFFSET = 104729  # the second copy's order seed, by default: the spec's + this (a fixed prime)


class InstabilitySection(Frozen):
    rewind_iters: list[Annotated[int, Field(ge=0)]] = Field(
        [0], min_length=1, max_length=64,
        description="the iterations k where the two copies part (0 = at init): Frankle et al. sweep k over the "
                    "first epochs")
    alphas: int = Field(30, ge=2, le=1001, description="evenly spaced points of the path, both ends included")
    splits: list[Literal["train", "val", "test"]] = Field(
        ["test"], min_length=1, max_length=3, description="where the error along the path is measured "
                                                          "(the paper: test; train costs a pass over it per point)")
    noise_seed: Seed | None = Field(None, description="the second copy's data-order seed (its SGD noise); None = "
                                                      f"the spec's order seed + {NOISE_SEED_OFFSET}")
    bn_stats: Literal["interpolate", "recompute"] = Field(
        "interpolate", description="BatchNorm running statistics on the path: interpolate (with the weights) or "
                                   "recompute (re-estimated at each point from bn_batches training batches)")
    bn_batches: int = Field(50, ge=1, le=10_000, description="bn_stats recompute: training batches per point")
    rewind_optimizer: REWIND_OPTIMIZER = rewind_optimizer_field()
    rounds: list[int] | None = Field(None, max_length=256,
                                     description="which rows to analyse: 0 = the dense net, r = IMP round r; "
                                                 "None = all")

    @model_validator(mode="after")
    def _unique(self) -> InstabilitySection:
        for name in ("rewind_iters", "splits", "rounds"):
            values = getattr(self, name) or []
            if len(set(values)) != len(values):
                raise ValueError(f"instability.{name}: {values} repeats an entry; allowed: each at most once")
        return self


class InstabilityPrune(FilterPrune):
    """IMP's own section (the lottery_ticket flow's, less its rewind point: that is each k)."""
    schedule: Literal["iterative"] = Field("iterative", description=schedule_help("iterative"))


class InstabilitySpec(ExperimentBase):
    flow: Literal["instability"] = "instability"
    retrain: TrainSpec | None = Field(None, description="IMP's retraining of each round; defaults to train")
    instability: InstabilitySection = Field(InstabilitySection(), description="where the copies part and how the "
                                                                             "path between them is measured")
    prune: InstabilityPrune | None = Field(None, description="also IMP's subnetworks (rewound to each k); "
                                                             "None = the dense net only")

    @model_validator(mode="after")
    def _fits(self) -> InstabilitySpec:
        ins = self.instability
        for k in ins.rewind_iters:
            rewind_fits(k, self.total_iterations, "instability.rewind_iters")
        if self.prune is None:
            if self.retrain is not None:
                raise ValueError("retrain: only IMP's rounds retrain; add a prune section or drop retrain")
            if any(r != 0 for r in ins.rounds or []):
                raise ValueError(f"instability.rounds: {ins.rounds} names IMP rounds but there is no prune section; "
                                 f"allowed: [0] (the dense net)")
        else:
            if max(ins.rewind_iters) > 0 and ins.rewind_optimizer == "restore":
                same_optimizer(self.train, self.retrain, "rewinding to k > 0 restores optimizer state")
            bad = [r for r in ins.rounds or [] if not 0 <= r <= self.prune.rounds]
            if bad:
                raise ValueError(f"instability.rounds: {bad}; allowed: 0 (dense) to {self.prune.rounds} "
                                 f"(prune.rounds)")
        if ins.bn_stats == "recompute" and not model_info(self.model.name).has_batch_norm(self.model.params):
            raise ValueError(f"instability.bn_stats: recompute, but {self.model.name} has no BatchNorm; "
                             f"allowed: interpolate")
        return self

    @property
    def retrain_spec(self) -> TrainSpec:
        return self.retrain or self.train

    @property
    def noise_seed(self) -> int:
        s = self.instability.noise_seed
        return self.order_seed + NOISE_SEED_OFFSET if s is None else s


@dataclass
class CopyRound(Round):
    """A row: the first copy (trained, evaluate), the path to the second (analysis), and k."""
    rewind_iter: int = 0


def interpolate_node(spec: InstabilitySpec, a: Node, b: Node, mask: Node | None) -> Node:
    ins = spec.instability
    fields: dict[str, Any] = {"data": data_fields(spec), "alphas": ins.alphas, "splits": list(ins.splits)}
    if model_info(spec.model.name).has_batch_norm(spec.model.params):  # BN-free nets: nothing to choose
        fields["bn"] = {"stats": ins.bn_stats}
        if ins.bn_stats == "recompute":
            fields["bn"] |= {"batches": ins.bn_batches, "data": train_data_fields(spec)}
    return Node("interpolate", "interpolate", fields, {"a": a, "b": b} | ({"mask": mask} if mask else {}))


def plan(spec: InstabilitySpec) -> Plan:
    """For each k: w_k; the dense copies and their path; then IMP rewound to k, each round's copies."""
    init, dense = dense_round(spec)
    wanted = set(spec.instability.rounds) if spec.instability.rounds is not None else None
    rows: list[Round] = []

    def row(name: str, k: int, density: float, mask: Node | None, a: Node, evaluate: Node, b: Node, r: int) -> None:
        if wanted is None or r in wanted:
            rows.append(CopyRound(len(rows), name, density, mask, a, evaluate, interpolate_node(spec, a, b, mask), k))

    for k in spec.instability.rewind_iters:
        wk = init if k == 0 else train_node(spec, "rewind", init, spec.train, stop_iter=k)
        state = rewind_state(spec.instability.rewind_optimizer, k)
        if state:  # the pretraining kept its optimizer past k: this first copy is a new training
            first = train_node(spec, "first copy", wk, spec.train, optimizer_state="fresh")
            first_eval = evaluate_node(spec, first, None)
        else:
            first, first_eval = dense.trained, dense.evaluate
        noise = train_node(spec, "second copy", wk, spec.train, order_seed=spec.noise_seed, optimizer_state=state)
        row(f"k={k} dense", k, 1.0, None, first, first_eval, noise, 0)
        if spec.prune is None:
            continue
        weights, mask = dense.trained, None
        for r, density in enumerate(spec.prune.round_densities(), start=1):
            mask = mask_node(spec, score_node(spec, weights, mask, density=density), mask, density,
                             spec.prune.mask_fields())
            weights = train_node(spec, "retrain", wk, spec.retrain_spec, mask=mask, optimizer_state=state)
            noise = train_node(spec, "second copy", wk, spec.retrain_spec, mask=mask, order_seed=spec.noise_seed,
                               optimizer_state=state)
            row(f"k={k} round {r}", k, density, mask, weights, evaluate_node(spec, weights, mask), noise, r)
    return Plan("instability", rows)


def label(spec: InstabilitySpec, rnd: Round) -> str:
    """One series per rewind point: IMP's accuracy against density at each k (the paper's Figure 5)."""
    k = getattr(rnd, "rewind_iter", 0)
    tag = spec.prune.tag() if spec.prune is not None else ""
    return f"IMP{nm_tag(spec.prune) if spec.prune else ''} from k={k}" + (f" ({tag})" if tag else "")


PARADIGM = register_paradigm("instability", InstabilitySpec, plan, label,
                             "Frankle et al. 2020: are two copies from iteration k linearly connected? "
                             "(dense and IMP subnetworks)", __doc__)
