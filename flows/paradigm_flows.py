"""One Prefect flow per registered paradigm, generated: a paradigm file in pai_core is all
a new paradigm needs. Each flow's one parameter is its own paradigm's spec class, so the
deployment's form shows only that paradigm's sections; it runs the one executor over a
plan of one (`run_spec`), as Prefect tasks, tracked in MLflow.

Each flow keeps the module path it always had (`flows.lottery_ticket:lottery_ticket`):
`flows/__init__.py` makes those modules point here, so deployments keep working.
"""
from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from prefect import Flow, flow
from prefect.states import Completed

from flows.results import instability_cells, publish_results
from flows.runner import PrefectTasks, crash_flow_runs, current_flow_run_id, run_logger, tag_flow_run
from flows.tracking import Tracking
from pai_core.executor import Job, execute
from pai_core.paradigms import Paradigm, build_plan, get_paradigm, paradigm_names
from pai_core.spec_io import overrides_between
from tasks.stages import default_store

OVERRIDES: ContextVar[list[str] | None] = ContextVar("pai_overrides", default=None)
"""What the caller changed in its spec file (`pai run SPEC a.b=c` sets it): names the MLflow run."""


def run_overrides(spec: Any) -> list[str]:
    """The overrides this run applied: the caller's, or, for a deployment run, the fields that
    differ from the deployment's own parameters (a custom run from the UI's form)."""
    if (given := OVERRIDES.get()) is not None:
        return given
    base = _deployment_spec()
    if not isinstance(base, dict):
        return []
    try:
        return overrides_between(type(spec).model_validate(base), spec)
    except Exception:  # noqa: BLE001 - the deployment's spec no longer validates: compare as data
        return overrides_between(base, spec)


def _deployment_spec() -> Any:
    """The `spec` parameter of the deployment this run came from (None outside a deployment run);
    `prefect.runtime.deployment.parameters` is the run's own parameters, not the deployment's."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    try:
        if not deployment.id:
            return None
        with get_client(sync_client=True) as client:
            return (client.read_deployment(UUID(str(deployment.id))).parameters or {}).get("spec")
    except Exception:  # noqa: BLE001 - no deployment to compare with: the run is named by its spec
        return None


def run_spec(spec: Any) -> Any:
    """Execute one spec's plan; raise the first stage failure after the rest has run. Publishes
    the results (Prefect artifacts, MLflow summary metrics) and ends the run with a state that
    says how many stages were computed and how many reused."""
    log, store = run_logger(), default_store()
    job = Job(spec, build_plan(spec))
    flow_run_id = current_flow_run_id()
    overrides = run_overrides(spec)
    tag_flow_run(flow_run_id, [o[:100] for o in overrides[:8]])  # the deployment's run list shows what changed
    tracking = Tracking([job], store, flow_run_id, log=log, overrides={id(job): overrides})
    crash_flow_runs(tracking.tracker(job).closed_flow_runs, f"superseded by flow run {current_flow_run_id()}")
    try:
        out = execute([job], PrefectTasks(), store, tracking)
    except BaseException:
        tracking.abort()
        raise
    tracker = tracking.tracker(job)
    summary = {"spec": spec.name, "flow": spec.flow, "mlflow_run_id": tracker.parent,
               "computed": out.computed, "reused": out.reused, "stages": out.stages}
    if out.errors:
        raise next(iter(out.errors.values()))
    summary["rounds"] = [{"round": r.name, "sparsity": out.refs[r.evaluate.key].info.sparsity,
                          "val_acc": out.refs[r.evaluate.key].info.val_acc,
                          "test_acc": out.refs[r.evaluate.key].info.test_acc, **instability_cells(r, out.refs)}
                         for r in job.plan.rounds]
    log.info("%d stages computed, %d reused", out.computed, out.reused)
    if flow_run_id:  # before the MLflow parent closes: a finished parent means a finished run
        try:
            summary["artifacts"] = publish_results(job, out, store, flow_run_id,
                                                   (tracker.experiment_id, tracker.parent))
        except Exception as e:  # noqa: BLE001 - the results are stored and tracked; only the UI copy is lost
            log.warning("results not published as Prefect artifacts: %s: %s", type(e).__name__, e)
    tracker.finish(summary)
    return Completed(message=f"{out.computed} stages computed, {out.reused} reused", data=summary)


def make_flow(p: Paradigm) -> Flow:
    def paradigm_flow(spec: Any) -> Any:
        return run_spec(spec)

    paradigm_flow.__annotations__ = {"spec": p.spec}
    paradigm_flow.__name__ = paradigm_flow.__qualname__ = p.name
    paradigm_flow.__module__ = f"flows.{p.name}"  # the entrypoint deployments have always used
    paradigm_flow.__doc__ = p.doc
    return flow(name=p.name, log_prints=True, description=p.description)(paradigm_flow)


FLOWS: dict[str, Flow] = {name: make_flow(get_paradigm(name)) for name in paradigm_names()}
