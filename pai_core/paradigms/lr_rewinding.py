"""Learning-rate rewinding (Renda, Frankle & Carbin, ICLR 2020): iterative magnitude pruning
that keeps the trained weights after each pruning step and replays the original learning-rate
schedule from iteration k to the end (k = 0: the whole schedule). The other arm of that
paper's comparison is weight rewinding (`lottery_ticket` with `prune.rewind_iter: k`), which
also resets the weights to their values at k.

k1 = K each round, k2 = K (the round's trained weights), f3 = retrain with the replayed
schedule: a fresh optimizer (or, `prune.optimizer: keep`, the trained one's momentum, as the
authors' code), the learning rate and data order of iterations k..K. Round 1's
score and mask are LTH's very nodes (same trained net, same criterion), so they are shared.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pai_core.paradigms.common import nm_tag, pretty, rewind_fits, same_optimizer
from pai_core.paradigms.registry import register_paradigm
from pai_core.plan import Plan, Round, dense_round, evaluate_node, mask_node, score_node, train_node
from pai_core.specs import ExperimentBase, PruneSpec, TrainSpec, schedule_help


class LRRewindPrune(PruneSpec):
    schedule: Literal["one_shot", "iterative"] = Field("iterative",
                                                       description=schedule_help("one_shot", "iterative"))
    lr_rewind_iter: int = Field(0, ge=0, description="replay the learning-rate schedule from this iteration "
                                                     "(0 = the whole schedule, Renda et al.'s recommendation)")
    optimizer: Literal["fresh", "keep"] = Field(
        "fresh", description="the replay's optimizer: fresh (the paper's description: a new optimizer, the "
                             "schedule replayed) or keep (the trained net's momentum carries on, as Renda et "
                             "al.'s code restores every variable and resets only the step)")


class LRRewindingSpec(ExperimentBase):
    flow: Literal["lr_rewinding"] = "lr_rewinding"
    retrain: TrainSpec | None = Field(None, description="the schedule replayed after each pruning; defaults to train")
    prune: LRRewindPrune = Field(description="magnitude pruning; the learning-rate schedule is rewound")

    @model_validator(mode="after")
    def _rewind(self) -> LRRewindingSpec:
        rewind_fits(self.prune.lr_rewind_iter, self.retrain_spec.total_iterations(self.data.iterations_per_epoch),
                    "prune.lr_rewind_iter")
        if self.prune.optimizer == "keep":
            same_optimizer(self.train, self.retrain, "prune.optimizer: keep carries the optimizer state on")
        return self

    @property
    def retrain_spec(self) -> TrainSpec:
        return self.retrain or self.train


def plan(spec: LRRewindingSpec) -> Plan:
    _, dense = dense_round(spec)
    rounds, weights, mask = [dense], dense.trained, None
    for r, density in enumerate(spec.prune.round_densities(), start=1):
        mask = mask_node(spec, score_node(spec, weights, mask, density=density), mask, density)
        weights = train_node(spec, "lr_rewind", weights, spec.retrain_spec, mask=mask, mode="replay",
                             from_iter=spec.prune.lr_rewind_iter,
                             optimizer_state="restored" if spec.prune.optimizer == "keep" else None)
        rounds.append(Round(r, f"round {r}", density, mask, weights, evaluate_node(spec, weights, mask)))
    return Plan("lr_rewinding", rounds)


def label(spec: LRRewindingSpec, rnd: Round) -> str:
    k = spec.prune.lr_rewind_iter
    extra = [s for s in (k and f"from {k}", spec.prune.optimizer == "keep" and "kept momentum") if s]
    return f"LR rewinding {pretty(spec.prune.criterion)}{nm_tag(spec.prune)}" + (f" ({', '.join(extra)})" if extra else "")


PARADIGM = register_paradigm("lr_rewinding", LRRewindingSpec, plan, label,
                             "Renda et al.: IMP keeping the trained weights, replaying the LR schedule from k", __doc__)
