"""Pruning at initialization (SNIP, GraSP, SynFlow, random, magnitude at init):
k1 = k2 = 0, f3 = train from scratch. The mask is chosen from the init (once, or over
`rounds` score-and-prune iterations at the init), then the sparse net is trained once. The
dense reference round is the very stage LTH and PaT call pretrain, so it is shared."""
from __future__ import annotations

from prefect import flow

from flows.runner import execute
from pai_core.plan import prune_at_init as plan_prune_at_init
from pai_core.specs import ExperimentSpec


@flow(name="prune_at_init", log_prints=True)
def prune_at_init(spec: ExperimentSpec) -> dict:
    return execute(spec, plan_prune_at_init(spec))
