"""Lottery Ticket Hypothesis (Frankle & Carbin 2019): iterative magnitude pruning with
rewinding. k1 = K each round (mask from trained weights), k2 = 0 or an early iteration k
(weights and optimizer state rewound), f3 = retrain to K. With `prune.reinit_control`,
each mask is also trained from a fresh random init: the control a winning ticket must beat.
"""
from __future__ import annotations

from prefect import flow

from flows.runner import execute
from pai_core.plan import lottery_ticket as plan_lottery_ticket
from pai_core.specs import ExperimentSpec


@flow(name="lottery_ticket", log_prints=True)
def lottery_ticket(spec: ExperimentSpec) -> dict:
    return execute(spec, plan_lottery_ticket(spec))
