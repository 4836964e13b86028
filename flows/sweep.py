"""Sweeps: specs × criteria × sparsities × seeds on a Dask cluster, each shared stage run once.

Before anything is submitted, every spec's plan is built and the stages are deduplicated by
stage key; stages already in the store are not submitted at all. What is left goes to Dask
through prefect-dask, each stage a Prefect task whose upstream futures Dask resolves, so a
worker starts a stage as soon as its inputs exist. Then every spec is tracked in MLflow
(nested under one sweep run) and the report is built and published.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from contextlib import nullcontext
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.context import get_run_context
from prefect.states import Failed

from flows.env import tracking_uri
from flows.report import publish_report
from flows.runner import run_logger as _logger
from flows.tracking import Tracker, sweep_run
from pai_core.plan import Node
from pai_core.store import Ref
from pai_core.sweep import DaskSpec, SweepSpec, plans_for, unique_nodes
from tasks.stages import TASKS, default_store, run_stage_task


def _label(node: Node, owner: dict[str, str]) -> str:
    return f"{node.role} · {owner[node.key]}"


def dask_runner(spec: DaskSpec) -> tuple[Any, int | None]:
    """A DaskTaskRunner: a LocalCluster here (each worker a process whose torch uses its share
    of the cores, returned too), or the scheduler at `spec.address`, whose workers were started
    elsewhere."""
    from prefect.client.orchestration import get_client
    from prefect_dask import DaskTaskRunner

    logging.getLogger("distributed").setLevel(logging.WARNING)  # not a line per worker event
    if spec.address:
        return DaskTaskRunner(address=spec.address), None
    threads = max(1, (os.cpu_count() or 1) // (spec.workers * spec.threads_per_worker))
    with get_client(sync_client=True) as client:  # the server this flow reports to, even a temporary one
        api = str(client.api_url)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": spec.workers, "threads_per_worker": spec.threads_per_worker, "processes": True,
        "dashboard_address": ":0", "resources": dict(spec.resources) or None,
        "env": {"PREFECT_API_URL": api}}), threads


Outcome = tuple[dict[str, Ref], dict[str, str]]  # computed refs; failed stage key -> why


def run_on_dask(pending: list[Node], refs: dict[str, Ref], spec: DaskSpec, devices: dict[str, str],
                owner: dict[str, str]) -> Outcome:
    import dask
    from distributed import as_completed

    runner, threads = dask_runner(spec)
    claim = dask.annotate(resources=dict(spec.resources)) if spec.resources else nullcontext()
    # distributed's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 and one OpenMP
    # thread; the first made torch training 1.5-2x slower here, the second ignores our share.
    spawn_env = dask.config.set({"distributed.nanny.pre-spawn-environ": {
        "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}} if threads else {})
    out: dict[str, Ref] = {}
    failed: dict[str, str] = {}
    with spawn_env, runner, claim:
        futures: dict[str, Any] = {}
        for node in pending:  # upstream first, so every input is a ref or an earlier future
            inputs = {k: futures.get(n.key) or refs[n.key] for k, n in node.inputs.items()}
            task = TASKS[node.role].with_options(refresh_cache=True)  # pending = not in the store
            futures[node.key] = runner.submit(task, parameters={
                "node": node, "inputs": inputs, "label": _label(node, owner), "device": devices[node.key]})
        by_future = {f.wrapped_future: (k, f) for k, f in futures.items()}
        nodes = {n.key: n for n in pending}
        with runner.client.as_current():  # as_completed looks for the current Dask client
            for i, done in enumerate(as_completed(list(by_future)), start=1):  # progress as stages finish
                key, future = by_future[done]
                label = _label(nodes[key], owner)
                try:
                    out[key] = future.result()
                except Exception as e:  # this stage and what needs it fail; the rest goes on
                    failed[key] = f"{type(e).__name__}: {e}"
                    _logger().error("[%d/%d] %s failed: %s", i, len(pending), label, failed[key])
                    continue
                _logger().info("[%d/%d] %s done (%.1f s, pid %s)", i, len(pending), label,
                               out[key].info.get("seconds", 0.0), out[key].info.get("computed_by", {}).get("pid"))
    return out, failed


def run_in_order(pending: list[Node], refs: dict[str, Ref], devices: dict[str, str],
                 owner: dict[str, str]) -> Outcome:
    out: dict[str, Ref] = {}
    failed: dict[str, str] = {}
    for node in pending:
        if bad := [n.key for n in node.inputs.values() if n.key in failed]:
            failed[node.key] = f"upstream stage {bad[0]} failed"
            continue
        inputs = {k: out.get(n.key) or refs[n.key] for k, n in node.inputs.items()}
        try:
            out[node.key], _ = run_stage_task(node, inputs, _label(node, owner), devices[node.key])
        except Exception as e:
            failed[node.key] = f"{type(e).__name__}: {e}"
    return out, failed


@flow(name="sweep", log_prints=True)
def sweep(sweep: SweepSpec, sequential: bool = False) -> Any:
    """Run every spec of the sweep; `sequential` runs the stages one by one in this process
    (the baseline `benchmarks/sweep.py` compares the Dask run with). A spec whose stage fails
    (a collapsed mask, say) is reported missing; the others finish, are tracked and reported,
    and the run ends Failed, naming it."""
    log, store = _logger(), default_store()
    specs = sweep.expand()
    plans = plans_for(specs)
    nodes = unique_nodes(plans)
    devices, owner = {}, {}
    for spec, plan in zip(specs, plans):
        for n in plan.nodes:
            devices.setdefault(n.key, spec.device)
            owner.setdefault(n.key, spec.name)
    refs: dict[str, Ref] = {n.key: r for n in nodes if (r := store.get(n.stage, n.key)) is not None}
    pending = [n for n in nodes if n.key not in refs]
    total = sum(len(p.nodes) for p in plans)
    log.info("%s: %d specs, %d stages in their plans, %d distinct; %d already stored, %d to run on %s",
             sweep.name, len(specs), total, len(nodes), len(refs), len(pending),
             "this process" if sequential else (sweep.dask.address or f"a LocalCluster of {sweep.dask.workers}"))
    computed, failed = ({}, {}) if not pending else (
        run_in_order(pending, refs, devices, owner) if sequential
        else run_on_dask(pending, refs, sweep.dask, devices, owner))
    refs |= computed
    executed = Counter(n.role for n in pending if n.key in computed)
    try:
        flow_run_id = str(get_run_context().flow_run.id)
    except Exception:
        flow_run_id = None
    parent = sweep_run(sweep, flow_run_id)
    rows, broken = [], {}
    for spec, plan in zip(specs, plans):
        if lost := [n for n in plan.nodes if n.key not in refs]:
            broken[spec.name] = next((f"{n.role}: {failed[n.key]}" for n in lost if n.key in failed), "not run")
            continue
        tracker = Tracker(spec, store, flow_run_id, parent_run_id=parent)
        for rnd in plan.rounds:
            tracker.log_round(rnd, refs, reused=not {rnd.trained.key, rnd.evaluate.key} & computed.keys())
            ev = refs[rnd.evaluate.key].info
            rows.append({"spec": spec.name, "round": rnd.name, "sparsity": ev["sparsity"], "test_acc": ev["test_acc"]})
        tracker.finish({"spec": spec.name})
    summary = {"sweep": sweep.name, "specs": len(specs), "stages_in_plans": total, "distinct_stages": len(nodes),
               "executed": dict(executed), "reused": len(nodes) - len(pending), "failed": broken, "rows": rows,
               "mlflow_run_id": parent}
    if rows:
        summary["report"] = publish_report(specs, store, sweep.name, parent, summary)
    else:
        summary["report"] = None
        MlflowClient(tracking_uri=tracking_uri()).set_terminated(parent, "FAILED")
    log.info("executed per stage role: %s", dict(executed) or "nothing (all stored)")
    if broken:
        for name, why in broken.items():
            log.error("%s: %s", name, why)
        return Failed(message=f"{len(broken)} of {len(specs)} specs failed, first {next(iter(broken))}: "
                              f"{next(iter(broken.values()))}", data=summary)
    return summary

