"""Runners for the one executor (pai_core.executor): stages as Prefect tasks in this flow
run, or spread over a Dask cluster through prefect-dask."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

from pai_core.executor import Done, InOrder, Work
from pai_core.store import Ref
from tasks.stages import run_stage_task, task_for


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger (its lines reach the UI), or a plain one outside a run."""
    from prefect import get_run_logger

    try:
        return get_run_logger()
    except Exception:
        return logging.getLogger("flows")


def current_flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.get_id()


class PrefectTasks(InOrder):
    """Each stage a task run of this flow run, in plan order; stored stages are submitted
    too, so the UI shows them Cached, each with a note of where its artifact came from."""
    submit_stored = True

    def __init__(self) -> None:
        self.states: dict[str, Any] = {}  # stage key -> its task run's final state (the graph's edges)

    def run_one(self, w: Work, inputs: dict[str, Ref]) -> tuple[Ref, str]:
        upstream = [self.states[n.key] for n in w.node.inputs.values() if n.key in self.states]
        ref, state = run_stage_task(w.node, inputs, w.label, w.device, w.live, upstream)
        self.states[w.node.key] = state
        if state.name == "Cached" or not ref.computed:
            from flows.results import publish_reused

            publish_reused(state.state_details.task_run_id, w.node, ref)
        return ref, state.name


def local_capacity(claims: dict[str, float]) -> dict[str, float] | None:
    """What each LocalCluster worker holds of every resource a stage claims: one whole unit (one
    GPU), or the claim if it is larger. A fractional claim then packs stages onto one device:
    `resources: {GPU: 0.25}` with `threads_per_worker: 4` runs four trainings per GPU worker."""
    return {k: max(1.0, float(v)) for k, v in claims.items()} or None


class DaskTasks:
    """Every pending stage submitted at once; Dask starts each as soon as its inputs exist."""
    submit_stored = False

    def __init__(self, spec: Any):  # a DaskSpec
        self.spec = spec

    def _runner(self) -> tuple[Any, int | None]:
        """A DaskTaskRunner: a LocalCluster here (each worker a process whose torch uses its share
        of the cores, returned too), or the scheduler at `spec.address`, whose workers were
        started elsewhere."""
        from prefect.client.orchestration import get_client
        from prefect_dask import DaskTaskRunner

        logging.getLogger("distributed").setLevel(logging.WARNING)  # not a line per worker event
        if self.spec.address:
            return DaskTaskRunner(address=self.spec.address), None
        threads = max(1, (os.cpu_count() or 1) // (self.spec.workers * self.spec.threads_per_worker))
        with get_client(sync_client=True) as client:  # the server this flow reports to, even a temporary one
            api = str(client.api_url)
        return DaskTaskRunner(cluster_kwargs={
            "n_workers": self.spec.workers, "threads_per_worker": self.spec.threads_per_worker, "processes": True,
            "dashboard_address": ":0", "resources": local_capacity(self.spec.resources),
            "env": {"PREFECT_API_URL": api}}), threads

    def run(self, work: Sequence[Work], refs: dict[str, Ref], done: Done) -> None:
        import dask
        from distributed import as_completed

        runner, threads = self._runner()
        claim = dask.annotate(resources=dict(self.spec.resources)) if self.spec.resources else nullcontext()
        # distributed's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 and one OpenMP
        # thread; the first made torch training 1.5-2x slower here, the second ignores our share.
        spawn_env = dask.config.set({"distributed.nanny.pre-spawn-environ": {
            "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}} if threads else {})
        with spawn_env, runner, claim:
            futures: dict[str, Any] = {}
            for w in work:  # upstream first, so every input is a ref or an earlier future
                inputs = {k: futures.get(n.key) or refs[n.key] for k, n in w.node.inputs.items()}
                task = task_for(w.node.role).with_options(refresh_cache=True)  # not in the store
                futures[w.node.key] = runner.submit(task, parameters={
                    "node": w.node, "inputs": inputs, "label": w.label, "device": w.device, "live": w.live})
            by_future = {futures[w.node.key].wrapped_future: (w, futures[w.node.key]) for w in work}
            with runner.client.as_current():  # as_completed looks for the current Dask client
                for i, finished in enumerate(as_completed(list(by_future)), start=1):
                    w, future = by_future[finished]
                    try:
                        ref = future.result()
                    except Exception as e:  # noqa: BLE001 - this stage and what needs it fail; the rest goes on
                        done(w, None, e, "Failed")
                        continue
                    run_logger().info("[%d/%d] %s done (%.1f s, pid %s)", i, len(work), w.label,
                                      ref.info.seconds or 0.0, (ref.info.computed_by or {}).get("pid"))
                    done(w, ref, None, "Completed")


def crash_flow_runs(ids: Sequence[str], why: str) -> None:
    """Mark flow runs a killed process left Running as Crashed (no process will ever finish them)."""
    if not ids:
        return
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        for i in ids:
            try:
                run = client.read_flow_run(UUID(i))
                if run.state is not None and run.state.is_running():
                    client.set_flow_run_state(run.id, Crashed(message=why), force=True)
                    run_logger().warning("flow run %s (%s) was left Running by a killed process: marked Crashed",
                                         run.name, i)
            except Exception as e:  # noqa: BLE001 - another server's run, or gone: nothing to mark
                run_logger().info("flow run %s not marked Crashed: %s", i, e)


def tag_flow_run(flow_run_id: str | None, tags: Sequence[str]) -> None:
    """Add tags to a flow run (what it changed in its spec), so the deployment's run list shows
    them; never a reason to fail the run."""
    if not flow_run_id or not tags:
        return
    from uuid import UUID

    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(flow_run_id))
            client.update_flow_run(run.id, tags=list(dict.fromkeys([*run.tags, *tags])))
    except Exception as e:  # noqa: BLE001
        run_logger().info("flow run %s not tagged: %s", flow_run_id, e)
