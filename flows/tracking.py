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
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from flows.env import local_tracking, mlflow_client
from flows.live import LiveRound, epoch_metrics
from flows.round_metrics import analysis_metrics, itop_metrics
from pai_core.executor import Hooks, Job
from pai_core.paths import pai_home
from pai_core.plan import Round
from pai_core.spec_io import clean_value, flatten
from pai_core.store import Ref, Store
from pai_core.sweep import SweepSpec

MAX_PARAMS_PER_BATCH = 100
MAX_RUN_NAME = 250


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3 UI: runs table, not GenAI


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment, made a model-training one (MLflow 3 otherwise opens it in its GenAI view)."""
    exp = client.get_experiment_by_name(name)
    if exp:
        if exp.tags.get("mlflow.experimentKind") is None:  # made by an older pai-flow, or by hand
            client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return exp.experiment_id
    # With no server, artifacts go under PAI_HOME; a server decides for itself (its
    # --artifacts-destination), so a remote worker never writes to its own disk.
    location = (pai_home() / "mlartifacts").as_uri() if local_tracking() else None
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def flow_run_url(flow_run_id: str | None) -> str | None:
    """The flow run's page in the Prefect UI, when there is a UI to link to."""
    if not flow_run_id:
        return None
    from prefect.utilities.urls import url_for

    try:
        return url_for("flow-run", obj_id=flow_run_id)
    except Exception:  # noqa: BLE001 - no UI configured: no link
        return None


def run_name(spec: Any, overrides: list[str] | None) -> str:
    """`lenet300_mnist [prune.rate=0.5, seed=1]`: the spec and what this run changed in it."""
    if not overrides:
        return spec.name
    changed = ", ".join(o for o in overrides if not o.startswith("name="))
    return f"{spec.name} [{changed}]"[:MAX_RUN_NAME] if changed else spec.name


def sweep_run(sweep: SweepSpec, flow_run_id: str | None) -> str:
    """The MLflow run a sweep's specs nest under; it also carries the sweep's report."""
    client = mlflow_client()
    exp = experiment_id(client, sweep.base[0].experiment)
    tags = {"pai.flow": "sweep", "pai.spec": sweep.name} | ({"prefect.flow_run_id": flow_run_id} if flow_run_id else {})
    run = client.create_run(exp, run_name=f"sweep {sweep.name}", tags=tags).info.run_id
    client.log_batch(run, params=[Param(f"grid.{k}", clean_value(v)[:500]) for k, v in sweep.grid.items()])
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
    """One spec's MLflow runs: a parent named after the spec and its overrides, carrying the
    spec's params and per-round summary metrics; a nested run per round (opened live by the
    stage that trains it, see flows.live); rounds a fully reused run already logged are linked,
    not logged twice."""

    def __init__(self, spec: Any, store: Store, flow_run_id: str | None = None, parent_run_id: str | None = None,
                 overrides: list[str] | None = None):
        self.spec, self.store = spec, store
        self.client = mlflow_client()
        self.experiment_id = experiment_id(self.client, spec.experiment)
        self.rounds: list[dict[str, float]] = []
        tags = {"pai.flow": spec.flow, "pai.spec": spec.name}
        if overrides:
            tags["pai.overrides"] = " ".join(overrides)[:5000]
        if flow_run_id:
            tags["prefect.flow_run_id"] = flow_run_id
            if url := flow_run_url(flow_run_id):
                tags["prefect.flow_run_url"] = url
                tags["mlflow.note.content"] = f"Prefect flow run: [{flow_run_id}]({url})"
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        tags |= _process_tags()
        self.parent = self.client.create_run(self.experiment_id, run_name=run_name(spec, overrides),
                                             tags=tags).info.run_id
        self.closed_flow_runs = self._close_dead_attempts(flow_run_id)
        params = [Param(k, clean_value(v)[:6000]) for k, v in flatten(spec).items()]
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
            if run.info.run_id == self.parent or t.get("pai.flow") != self.spec.flow or "pai.round" in t:
                continue  # this attempt, a sweep's own run, or a round (closed with its parent below)
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

    def live(self, rnd: Round) -> LiveRound:
        """Where the stage training this round's weights opens the round's run (flows.live)."""
        return LiveRound(self.experiment_id, self.parent, rnd.name, rnd.index, rnd.trained.key, self.spec.name,
                         self.spec.flow)

    def _find(self, filter_string: str) -> Any:
        runs = self.client.search_runs([self.experiment_id], filter_string, max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def log_round(self, rnd: Round, refs: dict[str, Ref], reused: bool) -> str:
        """The round's nested run, finished with its results; returns its id. A reused round that a
        finished run of this spec already holds (same weights, same evaluation) is linked, not logged again."""
        trained, evaluated = refs[rnd.trained.key], refs[rnd.evaluate.key]
        ev = evaluated.info
        self._log_parent_round(rnd, ev, refs)
        # A row is its evaluation, or, where rows share one (instability's dense row at each k), its path.
        which = (f"tags.`pai.analysis_key` = '{rnd.analysis.key}'" if rnd.analysis is not None
                 else f"tags.`pai.eval_key` = '{rnd.evaluate.key}'")
        if reused and (done := self._find(
                f"{which} and tags.`pai.spec` = '{_quote(self.spec.name)}' "
                f"and tags.`pai.flow` = '{self.spec.flow}' and attributes.status = 'FINISHED'")):
            self.client.set_tag(self.parent, f"pai.round.{rnd.index}.run_id", done.info.run_id)
            return done.info.run_id
        mask_ref = refs.get(rnd.mask.key) if rnd.mask else None
        tags = {"mlflow.parentRunId": self.parent, "pai.round": str(rnd.index), "pai.reused": str(reused).lower(),
                "pai.train_key": rnd.trained.key, "pai.eval_key": rnd.evaluate.key,
                "pai.weights_sha256": trained.sha256, "pai.mask_key": rnd.mask.key if rnd.mask else "dense",
                "pai.store": str(self.store.root), "pai.spec": self.spec.name, "pai.flow": self.spec.flow}
        if mask_ref is not None:
            tags["pai.mask_sha256"] = mask_ref.sha256
        if rnd.analysis is not None:
            tags["pai.analysis_key"] = rnd.analysis.key
        if trained.info.flow_run_id:
            tags["pai.computed_by_flow_run"] = trained.info.flow_run_id
        # RUNNING: a run an earlier row of this plan already finished (rows sharing their weights) is not this one's.
        live = self._find(f"tags.`mlflow.parentRunId` = '{self.parent}' and tags.`pai.live_for` = '{rnd.trained.key}' "
                          "and attributes.status = 'RUNNING'")
        if live is not None:
            rid = live.info.run_id
            self.client.log_batch(rid, tags=[RunTag(k, v) for k, v in tags.items()])
        else:
            rid = self.client.create_run(self.experiment_id, run_name=rnd.name, tags=tags).info.run_id
        now = int(time.time() * 1000)
        logged = {m.step for m in self.client.get_metric_history(rid, "epoch/val_acc")} if live is not None else set()
        metrics = [Metric(k, v, now, int(row["iteration"])) for row in getattr(trained.info, "history", [])
                   if int(row["iteration"]) not in logged for k, v in epoch_metrics(row).items()]
        final = {"val_acc": ev.val_acc, "test_acc": ev.test_acc, "val_loss": ev.val_loss,
                 "test_loss": ev.test_loss, "sparsity": ev.sparsity, "density": 1 - ev.sparsity}
        if ev.best:
            final |= {f"best_val/{k}": v for k, v in ev.best.model_dump().items()}
        final |= {f"layer_density/{name}": float(v["density"]) for name, v in ev.layers.items() if "density" in v}
        metrics += [Metric(k, float(v), now, 0) for k, v in final.items()]
        path = analysis_metrics(rnd, refs, now)
        metrics += path + itop_metrics(trained.info, now)
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(rid, metrics=metrics[i:i + 1000],
                                  params=[Param("round", str(rnd.index)), Param("density_target", clean_value(rnd.density))]
                                  if i == 0 else [])
        self.client.log_dict(rid, ev.layers, "sparsity_report.json")
        if path:
            self.client.log_dict(rid, refs[rnd.analysis.key].info.model_dump(mode="json"), "interpolation.json")
        if getattr(trained.info, "itop_rate", None) is not None:
            self.client.log_dict(rid, {k: getattr(trained.info, f"itop_{k}") for k in ("rate", "layers", "history")},
                                 "itop.json")
        if self.spec.tracking.copy_artifacts:
            self._copy_artifacts(rid, trained, mask_ref)
        self.client.set_terminated(rid)
        self.client.set_tag(self.parent, f"pai.round.{rnd.index}.run_id", rid)
        return rid

    def _log_parent_round(self, rnd: Round, ev: Any, refs: dict[str, Ref]) -> None:
        """Per-round results on the parent (step = round), so parents sort and chart in the runs table."""
        row = {"test_acc": ev.test_acc, "val_acc": ev.val_acc, "sparsity": ev.sparsity, "density": 1 - ev.sparsity}
        if rnd.analysis is not None:  # instability: the barrier per split, beside the accuracy
            row |= {f"instability_{s}": v for s, v in refs[rnd.analysis.key].info.instability.items()}
        if (itop := getattr(refs[rnd.trained.key].info, "itop_rate", None)) is not None:  # dynamic sparse
            row["itop_rate"] = itop
        self.rounds.append(row)
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent, metrics=[Metric(f"round/{k}", float(v), now, rnd.index)
                                                    for k, v in row.items()])

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
        """Summary metrics (final and best test accuracy, final sparsity, stages computed and
        reused) on the parent, then close it."""
        now, metrics = int(time.time() * 1000), {}
        if self.rounds:
            last = self.rounds[-1]
            metrics = {"final_test_acc": last["test_acc"], "final_val_acc": last["val_acc"],
                       "final_sparsity": last["sparsity"], "best_test_acc": max(r["test_acc"] for r in self.rounds),
                       "rounds": len(self.rounds)}
        for k in ("computed", "reused"):
            if isinstance(summary.get(k), int):
                metrics[f"stages_{k}"] = summary[k]
        if metrics:
            self.client.log_batch(self.parent, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        if summary:
            self.client.log_dict(self.parent, summary, "summary.json")
            self.client.set_tag(self.parent, "pai.computed_stages", str(summary.get("computed", "")))
            if summary.get("computed") == 0:
                self.client.set_tag(self.parent, "pai.all_reused", "true")
        self.client.set_terminated(self.parent, "FAILED" if failed else "FINISHED")
        if failed:  # a round whose training opened its run live and then failed
            for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING' and "
                                               f"tags.`mlflow.parentRunId` = '{self.parent}'"):
                self.client.set_terminated(run.info.run_id, "FAILED")


class Tracking(Hooks):
    """The executor's hooks: a parent run per spec made up front (a crash leaves it RUNNING for
    the retry to close), a nested run per round as soon as that round is complete."""

    def __init__(self, jobs: list[Job], store: Store, flow_run_id: str | None, parent_run_id: str | None = None,
                 log: Any = None, overrides: dict[int, list[str]] | None = None):
        """`overrides`: per job (by id), what this run changed in its spec (names the parent run)."""
        self.trackers = {id(j): Tracker(j.spec, store, flow_run_id, parent_run_id, (overrides or {}).get(id(j)))
                         for j in jobs}
        self.log = log

    def live(self, job: Job, rnd: Round, node: Any) -> LiveRound | None:
        return self.tracker(job).live(rnd) if node.key == rnd.trained.key else None

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


def log_to_round_run(spec: Any, row: int, texts: dict[str, str], dicts: dict[str, Any]) -> str | None:
    """Attach files to the newest finished MLflow run of a round (row `row` of the plan's rounds),
    found by its evaluation's stage key; returns its id, or None when the round was never tracked."""
    from pai_core.paradigms import build_plan

    client = mlflow_client()
    exp = client.get_experiment_by_name(spec.experiment)
    if exp is None:
        return None
    rnd = build_plan(spec).rounds[row]
    runs = client.search_runs([exp.experiment_id], f"tags.`pai.eval_key` = '{rnd.evaluate.key}' and "
                                                   "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    rid = runs[0].info.run_id
    for name, text in texts.items():
        client.log_text(rid, text, name)
    for name, d in dicts.items():
        client.log_dict(rid, d, name)
    return rid
