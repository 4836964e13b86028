"""Quiet, offline-friendly defaults, applied before Prefect or MLflow read their settings.
Each is only a default: a value the user exported wins.

When `pai server up` has recorded servers under PAI_HOME and they answer, clients (the
CLI, a worker's flow runs, a notebook importing `flows`) use them; otherwise Prefect runs
its temporary server and MLflow writes SQLite under PAI_HOME, with no server at all.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from pai_core.paths import pai_home

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",  # hides the temporary server's shutdown noise
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    # pai_core's own messages (reused, recomputed, resuming from checkpoint) in the run's logs
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pai_core",
    # ...which, used outside a flow (a notebook calling pai_core), go to the console only
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def apply_defaults() -> None:
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)
    if logging.getLogger("pai_core").level == logging.NOTSET:  # else the root's WARNING drops them
        logging.getLogger("pai_core").setLevel(logging.INFO)
    # Prefect's cache records sit beside the artifacts they point to, and so does the temporary
    # server's database (not ~/.prefect): one PAI_HOME, one history. A child process started
    # with another PAI_HOME inherits these from its parent: they follow its PAI_HOME, not the parent's.
    derived = {"PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(pai_home() / "prefect-results"),
               "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{pai_home() / 'prefect.db'}"}
    inherited = os.environ.get("PAI_DERIVED_FOR")
    for k, v in derived.items():
        if k not in os.environ or (inherited is not None and inherited != str(pai_home())):
            os.environ[k] = v
    os.environ["PAI_DERIVED_FOR"] = str(pai_home())
    from flows.local_state import tie_temporary_server_to_its_parent
    from flows.servers import client_env, read_state

    tie_temporary_server_to_its_parent()

    if read_state():
        for k, v in client_env().items():
            os.environ.setdefault(k, v)


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite database under PAI_HOME (no server needed)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{pai_home() / 'mlflow.db'}"


def local_tracking() -> bool:
    """True when MLflow writes its database directly (no tracking server in between)."""
    return tracking_uri().startswith("sqlite:")


ML_VIEW = "workflowType=machine_learning"
"""MLflow 3's UI opens experiments in its GenAI view unless a link asks for the model-training one
(a per-browser preference otherwise; the experiment's `mlflow.experimentKind` tag is set too)."""


def mlflow_ui_url(experiment_id: str | None = None, run_id: str | None = None, base: str | None = None) -> str:
    """A link into the MLflow UI's model-training view: the experiments, an experiment's runs, or a run."""
    where = "experiments" + (f"/{experiment_id}" if experiment_id else "") + \
        (f"/runs/{run_id}" if run_id else "/runs" if experiment_id else "")
    return f"{(base or tracking_uri()).rstrip('/')}/#/{where}?{ML_VIEW}"


def mlflow_client():  # noqa: ANN201 - MlflowClient; mlflow is imported only when tracking starts
    """The tracking client; a local SQLite database is first made complete, once, under a lock."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    if local_tracking() and uri.startswith("sqlite:///"):
        from flows.local_state import ensure_mlflow_db

        ensure_mlflow_db(Path(uri.removeprefix("sqlite:///")), pai_home() / "mlartifacts")
    return MlflowClient(tracking_uri=uri)
