"""Prune after training (PaT): k1 = k2 = K, f3 = fine-tune. One-shot prunes to the target
once; iterative prunes a fraction of the survivors each round and fine-tunes in between,
each round starting from the previous round's fine-tuned weights."""
from __future__ import annotations

from prefect import flow

from flows.runner import execute
from pai_core.plan import prune_after_training as plan_pat
from pai_core.specs import ExperimentSpec


@flow(name="prune_after_training", log_prints=True)
def prune_after_training(spec: ExperimentSpec) -> dict:
    return execute(spec, plan_pat(spec))
