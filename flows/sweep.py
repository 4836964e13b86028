"""Sweeps: specs × criteria × sparsities × seeds, each shared stage run once.

The one executor (pai_core.executor) builds every plan, deduplicates the stages by key and
skips those already stored; the rest go to Dask through prefect-dask (or run one by one in
this process). Every spec is tracked in MLflow, nested under one sweep run, round by round
as results arrive; then the report is built and published.
"""
from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.states import Failed

from flows.env import mlflow_client
from flows.report import publish_report
from flows.runner import DaskTasks, PrefectTasks, current_flow_run_id, run_logger
from flows.tracking import Tracking, sweep_run
from pai_core.executor import Job, execute
from pai_core.paradigms import build_plan
from pai_core.sweep import SweepSpec
from tasks.stages import default_store


class _Sequential(PrefectTasks):
    submit_stored = False  # a sweep never resubmits what the store holds


@flow(name="sweep", log_prints=True)
def sweep(sweep: SweepSpec, sequential: bool = False) -> Any:
    """Run every spec of the sweep; `sequential` runs the stages one by one in this process
    (the baseline `benchmarks/sweep.py` compares the Dask run with). A spec whose stage fails
    (a collapsed mask, say) is reported missing; the others finish, are tracked and reported,
    and the run ends Failed, naming it."""
    log, store = run_logger(), default_store()
    specs = sweep.expand()
    jobs = [Job(s, build_plan(s)) for s in specs]
    flow_run_id = current_flow_run_id()
    parent = sweep_run(sweep, flow_run_id)
    tracking = Tracking(jobs, store, flow_run_id, parent_run_id=parent)
    log.info("%s: %d specs on %s", sweep.name, len(specs),
             "this process" if sequential else (sweep.dask.address or f"a LocalCluster of {sweep.dask.workers}"))
    try:
        out = execute(jobs, _Sequential() if sequential else DaskTasks(sweep.dask), store, tracking)
    except BaseException:
        tracking.abort()
        raise
    rows = []
    for job in jobs:
        if job.spec.name in out.failed_jobs:
            continue
        for rnd in job.plan.rounds:
            ev = out.refs[rnd.evaluate.key].info
            rows.append({"spec": job.spec.name, "round": rnd.name, "sparsity": ev.sparsity, "test_acc": ev.test_acc})
        tracking.tracker(job).finish({"spec": job.spec.name})
    distinct = {n.key for j in jobs for n in j.plan.nodes}
    summary = {"sweep": sweep.name, "specs": len(specs), "stages_in_plans": sum(len(j.plan.nodes) for j in jobs),
               "distinct_stages": len(distinct), "executed": dict(out.executed),
               "reused": len(distinct) - sum(out.executed.values()) - len(out.errors),
               "failed": out.failed_jobs, "rows": rows, "mlflow_run_id": parent}
    if rows:
        summary["report"] = publish_report(specs, store, sweep.name, parent, summary)
    else:
        summary["report"] = None
        mlflow_client().set_terminated(parent, "FAILED")
    log.info("executed per stage role: %s", dict(out.executed) or "nothing (all stored)")
    if out.failed_jobs:
        for name, why in out.failed_jobs.items():
            log.error("%s: %s", name, why)
        first = next(iter(out.failed_jobs))
        return Failed(message=f"{len(out.failed_jobs)} of {len(specs)} specs failed, first {first}: "
                              f"{out.failed_jobs[first]}", data=summary)
    return summary
