"""Dynamic sparse training (SET, RigL): the mask changes while the network trains, at a
constant, exact sparsity. The initial mask is drawn at init (random, ERK by default) and
the dense reference round is shared with the other paradigms."""
from __future__ import annotations

from prefect import flow

from flows.runner import execute
from pai_core.plan import dynamic_sparse as plan_dynamic_sparse
from pai_core.specs import ExperimentSpec


@flow(name="dynamic_sparse", log_prints=True)
def dynamic_sparse(spec: ExperimentSpec) -> dict:
    return execute(spec, plan_dynamic_sparse(spec))
