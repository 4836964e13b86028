"""Sparse selection (edge-popup, Zhou et al.'s supermask): k1 = k2 = 0, f2 = f3 = identity.
A score per weight is trained, the weights never are; the learned mask over the frozen
weights is the result, evaluated beside the shared dense reference round."""
from __future__ import annotations

from prefect import flow

from flows.runner import execute
from pai_core.plan import supermask as plan_supermask
from pai_core.specs import ExperimentSpec


@flow(name="supermask", log_prints=True)
def supermask(spec: ExperimentSpec) -> dict:
    return execute(spec, plan_supermask(spec))
