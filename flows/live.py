"""Live training: what a researcher watches while a stage trains.

Inside a stage's Prefect task, the training loop's progress hook (pai_core.progress) is this
class: each evaluated epoch becomes a log line of the task run (iteration, losses,
accuracies), a Prefect progress artifact follows the iterations, and, for the stage that
trains a round's weights, that round's nested MLflow run is opened when training starts and
gets every epoch's metrics as it happens, so MLflow's charts update live. The tracker
(flows.tracking) finds the same run by its `pai.live_for` tag when the round completes and
finishes it there, so one round is one run however its stages were scheduled (in this
process, or on a Dask worker that reaches MLflow itself).

Watching never fails a stage: a tracking or API error is logged once and watching stops.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

EPOCH_METRICS = ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "lr")
ARTIFACT_EVERY_S = 10.0  # progress-artifact updates at most this often between epochs (each is an API call)


@dataclass(frozen=True)
class LiveRound:
    """Where a round's training reports live: its spec's parent MLflow run and its place in the plan."""
    experiment_id: str
    parent_run_id: str
    run_name: str          # "round 2"
    round: int
    train_key: str         # the stage whose training this is (the round's weights)
    spec: str
    flow: str


def epoch_metrics(row: dict[str, float]) -> dict[str, float]:
    return {f"epoch/{m}": float(row[m]) for m in EPOCH_METRICS if m in row}


def open_round_run(client: Any, live: LiveRound) -> str:
    """The round's nested MLflow run, opened now (RUNNING) and tagged so the tracker finds it."""
    tags = {"mlflow.parentRunId": live.parent_run_id, "pai.round": str(live.round), "pai.live_for": live.train_key,
            "pai.spec": live.spec, "pai.flow": live.flow, "pai.train_key": live.train_key}
    return client.create_run(live.experiment_id, run_name=live.run_name, tags=tags).info.run_id


class LiveTraining:
    """A pai_core `Progress` for a stage running as a Prefect task (see the module docstring)."""

    def __init__(self, label: str, live: LiveRound | None = None, logger: Any = None):
        self.label, self.live = label, live
        self.log = logger or logging.getLogger("flows.live")
        self.total, self.artifact, self.last_artifact = 0, None, 0.0
        self.client, self.run_id = None, None

    def start(self, label: str, total: int, done: int) -> None:
        self.total = max(total, 1)
        self.artifact = self._guard("progress artifact", self._create_artifact, done)
        if self.live is not None:
            self.run_id = self._guard("live MLflow run", self._open_run)
        where = f", live in MLflow run {self.run_id}" if self.run_id else ""
        self.log.info("%s: training iterations %d → %d%s", self.label, done, total, where)

    def _create_artifact(self, done: int) -> Any:
        from prefect.artifacts import create_progress_artifact
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is None:  # a notebook's training: no run to attach it to
            return None
        return create_progress_artifact(100.0 * done / self.total, description=f"{self.label}: training iterations")

    def _open_run(self) -> str:
        from flows.env import mlflow_client

        self.client = mlflow_client()
        return open_round_run(self.client, self.live)

    def update(self, done: int, **metrics: Any) -> None:
        if self.artifact is not None and time.monotonic() - self.last_artifact > ARTIFACT_EVERY_S:
            self._progress(done)

    def epoch(self, row: dict[str, float]) -> None:
        it = int(row["iteration"])
        parts = "  ".join(f"{k} {row[k]:.4f}" for k in ("train_loss", "val_acc", "test_acc") if k in row)
        self.log.info("%s: epoch %g, iteration %d/%d  %s", self.label, row.get("epoch", 0), it, self.total, parts)
        if self.run_id is not None:
            self._guard("live MLflow metrics", self._log_epoch, row, it)
        if self.artifact is not None:
            self._progress(it)

    def _log_epoch(self, row: dict[str, float], it: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, it) for k, v in epoch_metrics(row).items()])

    def _progress(self, done: int) -> None:
        from prefect.artifacts import update_progress_artifact

        self.last_artifact = time.monotonic()
        if self._guard("progress artifact", update_progress_artifact, self.artifact,
                       round(100.0 * min(done, self.total) / self.total, 2)) is None:
            self.artifact = None

    def finish(self) -> None:
        pass  # the round's run stays open for the evaluation; the tracker closes it

    def _guard(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - watching must never fail the training it watches
            self.log.warning("%s: %s unavailable (%s: %s); training goes on without it", self.label, what,
                             type(e).__name__, e)
            if what.startswith("live MLflow"):
                self.run_id = None
            return None
