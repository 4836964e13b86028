"""Execute a plan as Prefect tasks, round by round, tracking each round in MLflow.

Every paradigm flow is `execute(spec, plan)`: the paradigm lives in its plan
(pai_core.plan), the orchestration (tasks, caching, tracking, summary) lives here once.
"""
from __future__ import annotations

import logging
from typing import Any

from prefect import get_run_logger
from prefect.context import get_run_context

from flows.tracking import Tracker
from pai_core.plan import Plan
from pai_core.specs import ExperimentSpec
from pai_core.store import Ref
from tasks.stages import default_store, run_stage_task


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger (its lines reach the UI), or a plain one outside a run."""
    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger("flows")


def execute(spec: ExperimentSpec, plan: Plan) -> dict[str, Any]:
    log, store = run_logger(), default_store()
    try:
        flow_run_id = str(get_run_context().flow_run.id)
    except Exception:
        flow_run_id = None
    tracker = Tracker(spec, store, flow_run_id)
    refs: dict[str, Ref] = {}
    stages: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    try:
        for rnd, nodes in zip(plan.rounds, plan.nodes_by_round()):
            round_reused = True
            for node in nodes:
                label = f"{node.role} · {rnd.name}" if rnd.index else node.role
                inputs = {k: refs[n.key] for k, n in node.inputs.items()}
                refs[node.key], state = run_stage_task(node, inputs, label, spec.device)
                # Cached: Prefect skipped the task. Completed without computing: Prefect had no
                # record (another PAI_HOME, a notebook run) but the store did.
                reused = state == "Cached" or not refs[node.key].computed
                round_reused &= reused
                stages.append({"stage": node.stage, "role": node.role, "round": rnd.name, "key": node.key,
                               "status": "reused" if reused else "computed", "prefect_state": state,
                               "seconds": 0.0 if reused else refs[node.key].info.get("seconds", 0.0)})
                log.info("%-9s %-14s %s %s", node.role, rnd.name, node.key, stages[-1]["status"])
            tracker.log_round(rnd, refs, round_reused)
            ev = refs[rnd.evaluate.key].info
            log.info("%s: sparsity %.4f  val %.4f  test %.4f", rnd.name, ev["sparsity"], ev["val_acc"], ev["test_acc"])
        summary = {
            "spec": spec.name, "flow": spec.flow, "mlflow_run_id": tracker.parent,
            "computed": sum(s["status"] == "computed" for s in stages),
            "reused": sum(s["status"] == "reused" for s in stages),
            "stages": stages,
            "rounds": [{"round": r.name, "sparsity": refs[r.evaluate.key].info["sparsity"],
                        "val_acc": refs[r.evaluate.key].info["val_acc"],
                        "test_acc": refs[r.evaluate.key].info["test_acc"]} for r in plan.rounds],
        }
        log.info("%d stages computed, %d reused", summary["computed"], summary["reused"])
    except BaseException:
        tracker.finish({"stages": stages}, failed=True)
        raise
    tracker.finish(summary)
    return summary
