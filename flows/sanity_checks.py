"""Sanity checks on a pruning mask (Frankle et al. 2021, Su et al. 2020): does the mask's
*position* matter, or only its layer-wise densities? One round's mask of a base paradigm
is trained beside a random reinit, a layer-wise shuffle and the inverted-score mask, all
with the original's schedule; one results table compares them. The base paradigm's
stages are the same nodes as a standalone run of it, so they are reused."""
from __future__ import annotations

from prefect import flow

from flows.runner import execute
from pai_core.plan import sanity_checks as plan_sanity_checks
from pai_core.specs import ExperimentSpec


@flow(name="sanity_checks", log_prints=True)
def sanity_checks(spec: ExperimentSpec) -> dict:
    return execute(spec, plan_sanity_checks(spec))
