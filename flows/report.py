"""Publishing a report: the PNGs and the table go to MLflow (as artifacts of a run) and to
Prefect (as artifacts of the flow run, so they show in the UI's Artifacts tab).

The plots go to Prefect as image artifacts with `data:` URLs: the picture travels inside the
artifact, so the Prefect UI shows it whether or not an MLflow server is running.
"""
from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_image_artifact, create_link_artifact, create_markdown_artifact

from flows.env import local_tracking, mlflow_client, tracking_uri
from flows.tracking import experiment_id
from pai_core.paths import pai_home
from pai_core.report import aggregate, write_report
from pai_core.paradigms import ExperimentSpec
from pai_core.store import Store


def _slug(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", name.lower())).strip("-") or "report"


def _data_url(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()


def mlflow_run_url(run_id: str) -> str | None:
    """The run's page in the MLflow UI when a tracking server is in use."""
    if local_tracking():
        return None
    client = mlflow_client()
    return f"{tracking_uri().rstrip('/')}/#/experiments/{client.get_run(run_id).info.experiment_id}/runs/{run_id}"


def publish_report(specs: list[ExperimentSpec], store: Store, name: str, mlflow_run_id: str | None = None,
                   summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the report under PAI_HOME/reports/<name>/, log it to MLflow and Prefect.

    Without `mlflow_run_id`, a "report <name>" run is created in the first spec's experiment.
    Returns where everything went."""
    out = pai_home() / "reports" / _slug(name)
    report = write_report(specs, store, out)
    client = mlflow_client()
    own_run = mlflow_run_id is None
    if own_run:
        mlflow_run_id = client.create_run(experiment_id(client, specs[0].experiment), run_name=f"report {name}",
                                          tags={"pai.flow": "report", "pai.spec": name}).info.run_id
    for f in (report.accuracy_png, report.layers_png, report.markdown):
        client.log_artifact(mlflow_run_id, str(f), "report")
    if summary is not None:
        client.log_dict(mlflow_run_id, summary, "summary.json")
    client.set_terminated(mlflow_run_id)

    key = _slug(f"pai-report-{name}")
    table = report.markdown.read_text().split("\n![", 1)[0]
    link = mlflow_run_url(mlflow_run_id)
    where = f"[MLflow run]({link})" if link else f"MLflow run `{mlflow_run_id}` ({tracking_uri()})"
    create_markdown_artifact(f"{table}\nPlots and table: `{out}`; {where}.\n", key=key,
                             description=f"pai-flow report: {name}")
    create_image_artifact(_data_url(report.accuracy_png), key=f"{key}-accuracy",
                          description=f"{name}: test accuracy vs density (log), seed error bars, dense baseline")
    create_image_artifact(_data_url(report.layers_png), key=f"{key}-layers", description=f"{name}: per-layer density")
    if link:
        create_link_artifact(link, link_text=f"MLflow: {name}", key=f"{key}-mlflow")
    return {"dir": str(out), "accuracy_png": str(report.accuracy_png), "layers_png": str(report.layers_png),
            "markdown": str(report.markdown), "mlflow_run_id": mlflow_run_id, "prefect_artifact_key": key,
            "groups": len(aggregate(report.points)), "missing": [list(m) for m in report.missing]}


@flow(name="report", log_prints=True)
def report(specs: list[ExperimentSpec], name: str) -> dict[str, Any]:
    """Build and publish the report of finished specs (a flow, so its artifacts have a run)."""
    from tasks.stages import default_store

    return publish_report(specs, default_store(), name)
