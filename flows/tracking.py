"""MLflow tracking: one parent run per spec, one nested run per round, as executor hooks.

Uses `MlflowClient` with explicit run ids rather than the fluent API's thread-local
active run, so it is correct whatever thread or worker a flow runs on. Metrics go in
batches (one call per round, DESIGN.md §6: 30x cheaper than single calls). Weights and
masks stay in the verified store: a round records their store key and sha256, and copies
the files only with `tracking.copy_artifacts`.
"""
from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from flows.env import local_tracking, mlflow_client
from pai_core.executor import Hooks, Job
from pai_core.paths import pai_home
from pai_core.plan import Round
from pai_core.spec_io import flatten
from pai_core.store import Ref, Store
from pai_core.sweep import SweepSpec

HISTORY_METRICS = ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "lr")
MAX_PARAMS_PER_BATCH = 100


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    # With no server, artifacts go under PAI_HOME; a server decides for itself (its
    # --artifacts-destination), so a remote worker never writes to its own disk.
    location = (pai_home() / "mlartifacts").as_uri() if local_tracking() else None
    return client.create_experiment(name, artifact_location=location)


def sweep_run(sweep: SweepSpec, flow_run_id: str | None) -> str:
    """The MLflow run a sweep's specs nest under; it also carries the sweep's report."""
    client = mlflow_client()
    exp = experiment_id(client, sweep.base[0].experiment)
    tags = {"pai.flow": "sweep", "pai.spec": sweep.name} | ({"prefect.flow_run_id": flow_run_id} if flow_run_id else {})
    run = client.create_run(exp, run_name=f"sweep {sweep.name}", tags=tags).info.run_id
    client.log_batch(run, params=[Param(f"grid.{k}", str(v)[:500]) for k, v in sweep.grid.items()])
    client.log_text(run, yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False), "sweep.yaml")
    return run


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _process_tags() -> dict[str, str]:
    """Who runs this attempt: a later run on this host can tell whether it is still alive."""
    me = psutil.Process()
    return {"pai.host": socket.gethostname(), "pai.pid": str(me.pid), "pai.pid_started": str(me.create_time())}


def _process_gone(tags: dict[str, str]) -> bool:
    """The attempt's process ran on this host and is no longer there (pid gone or reused)."""
    if tags.get("pai.host") != socket.gethostname() or "pai.pid" not in tags:
        return False
    try:
        return str(psutil.Process(int(tags["pai.pid"])).create_time()) != tags.get("pai.pid_started")
    except (psutil.NoSuchProcess, ValueError):
        return True


class Tracker:
    def __init__(self, spec: Any, store: Store, flow_run_id: str | None = None, parent_run_id: str | None = None):
        self.spec, self.store = spec, store
        self.client = mlflow_client()
        self.experiment_id = experiment_id(self.client, spec.experiment)
        tags = {"pai.flow": spec.flow, "pai.spec": spec.name}
        if flow_run_id:
            tags["prefect.flow_run_id"] = flow_run_id
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        tags |= _process_tags()
        self.parent = self.client.create_run(self.experiment_id, run_name=spec.name, tags=tags).info.run_id
        self.closed_flow_runs = self._close_dead_attempts(flow_run_id)
        params = [Param(k, str(v)) for k, v in flatten(spec).items()]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.parent, params=params[i:i + MAX_PARAMS_PER_BATCH])
        self.client.log_text(self.parent, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False),
                             "spec.yaml")

    def _close_dead_attempts(self, flow_run_id: str | None) -> list[str]:
        """Runs of this spec that a killed attempt left RUNNING are marked KILLED (with their nested
        runs) and point at this one: a retried flow run's earlier attempt, or any attempt whose
        process on this host is gone. Returns their Prefect flow run ids (to mark those Crashed)."""
        stale = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING' and "
                                                              f"tags.`pai.spec` = '{_quote(self.spec.name)}'")
        closed = []
        for run in stale:  # a sweep's own run and its other specs share the flow run id: not those
            t = run.data.tags
            if run.info.run_id == self.parent or t.get("pai.flow") != self.spec.flow:
                continue
            if t.get("prefect.flow_run_id") != flow_run_id and not _process_gone(t):
                continue  # a live attempt elsewhere, or on this host: leave it alone
            for child in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING' and "
                                                 f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"):
                self.client.set_terminated(child.info.run_id, "KILLED")
            self.client.set_tag(run.info.run_id, "pai.superseded_by", self.parent)
            self.client.set_terminated(run.info.run_id, "KILLED")
            if t.get("prefect.flow_run_id") and t["prefect.flow_run_id"] != flow_run_id:
                closed.append(t["prefect.flow_run_id"])
        return closed

    def log_round(self, rnd: Round, refs: dict[str, Ref], reused: bool) -> None:
        trained, evaluated = refs[rnd.trained.key], refs[rnd.evaluate.key]
        mask_ref = refs.get(rnd.mask.key) if rnd.mask else None
        tags = {"mlflow.parentRunId": self.parent, "pai.round": str(rnd.index), "pai.reused": str(reused).lower(),
                "pai.train_key": rnd.trained.key, "pai.weights_sha256": trained.sha256,
                "pai.mask_key": rnd.mask.key if rnd.mask else "dense",
                "pai.store": str(self.store.root)}
        if mask_ref is not None:
            tags["pai.mask_sha256"] = mask_ref.sha256
        run = self.client.create_run(self.experiment_id, run_name=rnd.name, tags=tags)
        rid, now = run.info.run_id, int(time.time() * 1000)
        history = getattr(trained.info, "history", [])
        metrics = [Metric(f"epoch/{m}", float(row[m]), now, int(row["iteration"]))
                   for row in history for m in HISTORY_METRICS if m in row]
        ev = evaluated.info
        final = {"val_acc": ev.val_acc, "test_acc": ev.test_acc, "val_loss": ev.val_loss,
                 "test_loss": ev.test_loss, "sparsity": ev.sparsity, "density": 1 - ev.sparsity}
        if ev.best:
            final |= {f"best_val/{k}": v for k, v in ev.best.model_dump().items()}
        metrics += [Metric(k, float(v), now, 0) for k, v in final.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(rid, metrics=metrics[i:i + 1000],
                                  params=[Param("round", str(rnd.index)), Param("density_target", str(rnd.density))]
                                  if i == 0 else [])
        self.client.log_dict(rid, ev.layers, "sparsity_report.json")
        if self.spec.tracking.copy_artifacts:
            self._copy_artifacts(rid, trained, mask_ref)
        self.client.set_terminated(rid)

    def _copy_artifacts(self, rid: str, trained: Ref, mask_ref: Ref | None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            payload = self.store.load(trained)
            torch.save(payload["model"], Path(tmp) / "weights.pt")
            self.client.log_artifact(rid, str(Path(tmp) / "weights.pt"))
            # A dynamic run's final mask travels with its weights; otherwise the round's mask.
            mask = payload.get("mask") or (self.store.load(mask_ref)["mask"] if mask_ref else None)
            if mask is not None:
                torch.save(mask, Path(tmp) / "mask.pt")
                self.client.log_artifact(rid, str(Path(tmp) / "mask.pt"))

    def finish(self, summary: dict[str, Any], failed: bool = False) -> None:
        if summary:
            self.client.log_dict(self.parent, summary, "summary.json")
            self.client.set_tag(self.parent, "pai.computed_stages", str(summary.get("computed", "")))
        self.client.set_terminated(self.parent, "FAILED" if failed else "FINISHED")


class Tracking(Hooks):
    """The executor's hooks: a parent run per spec made up front (a crash leaves it RUNNING for
    the retry to close), a nested run per round as soon as that round is complete."""

    def __init__(self, jobs: list[Job], store: Store, flow_run_id: str | None, parent_run_id: str | None = None,
                 log: Any = None):
        self.trackers = {id(j): Tracker(j.spec, store, flow_run_id, parent_run_id) for j in jobs}
        self.log = log

    def tracker(self, job: Job) -> Tracker:
        return self.trackers[id(job)]

    def round_done(self, job: Job, rnd: Round, refs: dict[str, Ref], reused: bool) -> None:
        self.tracker(job).log_round(rnd, refs, reused)
        if self.log is not None:
            ev = refs[rnd.evaluate.key].info
            self.log.info("%s %s: sparsity %.4f  val %.4f  test %.4f", job.spec.name, rnd.name, ev.sparsity,
                          ev.val_acc, ev.test_acc)

    def job_done(self, job: Job, refs: dict[str, Ref], failed: str | None) -> None:
        if failed:
            self.tracker(job).finish({"spec": job.spec.name, "failed": failed}, failed=True)

    def abort(self) -> None:
        """The flow itself failed (an interrupt): close every parent still open as failed."""
        for t in self.trackers.values():
            t.client.set_terminated(t.parent, "FAILED")
