"""Publishing a report: the plots (PNG, PDF, SVG) and the table go to MLflow (as artifacts of a
run) and to Prefect (as artifacts of the flow run, so they show in the UI's Artifacts tab).

The PNGs go to Prefect as image artifacts with `data:` URLs: the picture travels inside the
artifact, so the Prefect UI shows it whether or not an MLflow server is running.

`specs_of_flow_run` turns a finished (or running) flow run back into the specs it ran, so
`pai report --flow-run ID` reports a run started from the UI without its YAML at hand.
"""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow
from pydantic import ValidationError
from prefect.artifacts import create_image_artifact, create_link_artifact, create_markdown_artifact

from flows.env import local_tracking, mlflow_client, mlflow_ui_url, tracking_uri
from flows.results import slug
from flows.tracking import experiment_id
from pai_core.paths import pai_home
from pai_core.report import PLOTS, aggregate, without_images, write_report
from pai_core.paradigms import ExperimentSpec
from pai_core.spec_io import SpecError, _one_line, parse_spec
from pai_core.store import Store
from pai_core.sweep import SweepSpec


def _data_url(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()


def mlflow_run_url(run_id: str) -> str | None:
    """The run's page in the MLflow UI when a tracking server is in use."""
    if local_tracking():
        return None
    return mlflow_ui_url(mlflow_client().get_run(run_id).info.experiment_id, run_id)


def publish_report(specs: list[ExperimentSpec], store: Store, name: str, mlflow_run_id: str | None = None,
                   summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the report under PAI_HOME/reports/<name>/, log it to MLflow and Prefect.

    Without `mlflow_run_id`, a "report <name>" run is created in the first spec's experiment.
    Returns where everything went."""
    out = pai_home() / "reports" / slug(name)
    report = write_report(specs, store, out)
    client = mlflow_client()
    own_run = mlflow_run_id is None
    if own_run:
        mlflow_run_id = client.create_run(experiment_id(client, specs[0].experiment), run_name=f"report {name}",
                                          tags={"pai.flow": "report", "pai.spec": name}).info.run_id
    for f in report.files:
        client.log_artifact(mlflow_run_id, str(f), "report")
    if summary is not None:
        client.log_dict(mlflow_run_id, summary, "summary.json")
    client.set_terminated(mlflow_run_id)

    key = slug(f"pai-report-{name}")
    table = without_images(report.markdown.read_text())
    link = mlflow_run_url(mlflow_run_id)
    where = f"[MLflow run]({link})" if link else f"MLflow run `{mlflow_run_id}` ({tracking_uri()})"
    create_markdown_artifact(f"{table}\nPlots and table: `{out}`; {where}.\n", key=key,
                             description=f"pai-flow report: {name}")
    create_image_artifact(_data_url(report.accuracy_png), key=f"{key}-accuracy",
                          description=f"{name}: test accuracy vs density (log), seed error bars, dense baseline")
    create_image_artifact(_data_url(report.layers_png), key=f"{key}-layers", description=f"{name}: per-layer density")
    create_image_artifact(_data_url(report.flops_png), key=f"{key}-flops",
                          description=f"{name}: test accuracy vs inference FLOPs (share of dense, log)")
    if report.extra:  # an instability analysis's figure
        create_image_artifact(_data_url(report.extra[0]), key=f"{key}-instability",
                              description=f"{name}: error on the interpolation paths, instability vs rewind point")
    if link:
        create_link_artifact(link, link_text=f"MLflow: {name}", key=f"{key}-mlflow")
    plots = {f"{plot}_{ext}": str(getattr(report, f"{plot}_{ext}"))
             for plot in PLOTS for ext in ("png", "pdf", "svg")}
    return {"dir": str(out), **plots, "extra": [str(f) for f in report.extra], "markdown": str(report.markdown),
            "mlflow_run_id": mlflow_run_id,
            "prefect_artifact_key": key, "groups": len(aggregate(report.points)),
            "missing": [list(m) for m in report.missing]}


def read_flow_run(flow_run_id: UUID) -> Any:
    """The flow run from the Prefect API (raises prefect's ObjectNotFound for an unknown id)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def specs_of_flow_run(flow_run: Any) -> tuple[list[ExperimentSpec], str]:
    """The specs a paradigm flow run (parameter `spec`) or a sweep run (`sweep`) ran, and the
    report's default name; a SpecError for any other flow run or an invalid parameter."""
    params, run = flow_run.parameters or {}, f"flow run {flow_run.name!r}"
    if "sweep" in params:
        try:
            sweep = SweepSpec.model_validate(params["sweep"])
        except ValidationError as err:
            raise SpecError(f"{run}: sweep: {_one_line(err, SweepSpec)}") from None
        return sweep.expand(), sweep.name
    if "spec" in params:
        try:
            spec = parse_spec(params["spec"])
        except SpecError as e:
            raise SpecError(f"{run}: spec: {e}") from None
        return [spec], spec.name
    raise SpecError(f"{run} has neither a `spec` nor a `sweep` parameter (it has: {', '.join(params) or 'none'}); "
                    "give the id of a paradigm flow run or a sweep run")


@flow(name="report", log_prints=True)
def report(specs: list[ExperimentSpec], name: str) -> dict[str, Any]:
    """Build and publish the report of finished specs (a flow, so its artifacts have a run)."""
    from tasks.stages import default_store

    return publish_report(specs, default_store(), name)
