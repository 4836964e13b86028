"""Lottery Ticket Hypothesis (Frankle & Carbin 2019): iterative magnitude pruning with
rewinding. k1 = K each round (mask from trained weights), k2 = 0 or an early iteration k
(weights, optimizer state, LR position and data order rewound), f3 = retrain to K. With
`prune.reinit_control`, each mask is also trained from a fresh random init: the control a
winning ticket must beat.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pai_core.paradigms.common import (REWIND_OPTIMIZER, nm_tag, pretty, rewind_fits, rewind_optimizer_field,
                                       rewind_state, same_optimizer, scope_tag)
from pai_core.paradigms.registry import register_paradigm
from pai_core.plan import (REINIT_SEED_OFFSET, Plan, Round, dense_round, evaluate_node, init_node, mask_node,
                           score_node, train_node)
from pai_core.paradigms.filters import FilterPrune
from pai_core.specs import ExperimentBase, TrainSpec, schedule_help


class LotteryPrune(FilterPrune):
    schedule: Literal["iterative"] = Field("iterative", description=schedule_help("iterative"))
    rewind_iter: int = Field(0, ge=0, description="0 = original init, k = late rewinding to iteration k")
    rewind_optimizer: REWIND_OPTIMIZER = rewind_optimizer_field()
    reinit_control: bool = Field(False, description="also train each mask from a fresh random init")


class LotteryTicketSpec(ExperimentBase):
    flow: Literal["lottery_ticket"] = "lottery_ticket"
    retrain: TrainSpec | None = Field(None, description="each round's retraining; defaults to train")
    prune: LotteryPrune = Field(description="iterative magnitude pruning and rewinding")

    @model_validator(mode="after")
    def _rewind(self) -> LotteryTicketSpec:
        rewind_fits(self.prune.rewind_iter, self.total_iterations)
        if self.prune.rewind_iter and self.prune.rewind_optimizer == "restore":
            same_optimizer(self.train, self.retrain, "late rewinding restores optimizer state")
        return self

    @property
    def retrain_spec(self) -> TrainSpec:
        return self.retrain or self.train


def plan(spec: LotteryTicketSpec) -> Plan:
    """IMP: train; prune p% of what is left by the criterion; rewind to iteration k; retrain; repeat."""
    init, dense = dense_round(spec)
    k = spec.prune.rewind_iter
    rewind = init if k == 0 else train_node(spec, "rewind", init, spec.train, stop_iter=k)
    rounds, weights, mask = [dense], dense.trained, None
    for r, density in enumerate(spec.prune.round_densities(), start=1):
        mask = mask_node(spec, score_node(spec, weights, mask, density=density), mask, density,
                         spec.prune.mask_fields())
        weights = train_node(spec, "retrain", rewind, spec.retrain_spec, mask=mask,
                             optimizer_state=rewind_state(spec.prune.rewind_optimizer, k))
        rounds.append(Round(r, f"round {r}", density, mask, weights,
                            evaluate_node(spec, weights, mask, physical=spec.prune.physical)))
        if spec.prune.reinit_control:
            fresh = init_node(spec, seed=spec.seed + REINIT_SEED_OFFSET)
            ctrl = train_node(spec, "reinit", fresh, spec.retrain_spec, mask=mask)
            rounds.append(Round(r, f"round {r} reinit", density, mask, ctrl, evaluate_node(spec, ctrl, mask)))
    return Plan("lottery_ticket", rounds)


def label(spec: LotteryTicketSpec, rnd: Round) -> str:
    k = spec.prune.rewind_iter
    rewind = k and f"rewind {k}" + (" fresh opt" if rewind_state(spec.prune.rewind_optimizer, k) else "")
    p = spec.prune
    criterion = p.criterion != "magnitude" and pretty(p.criterion)  # IMP's own is magnitude
    extra = [s for s in (criterion, scope_tag(p), rewind, p.tag()) if s]
    return "LTH" + nm_tag(spec.prune) + (" reinit" if rnd.name.endswith("reinit") else "") + (
        f" ({', '.join(extra)})" if extra else "")


PARADIGM = register_paradigm("lottery_ticket", LotteryTicketSpec, plan, label,
                             "LTH / iterative magnitude pruning, rewinding weights to init or iteration k", __doc__)
