"""What every paradigm flow run publishes in the Prefect UI, beside its MLflow runs.

- A table artifact: per round, target and measured sparsity, val/test accuracy, and whether
  the round was computed or reused from the store.
- The accuracy-vs-density plot of this spec (an image artifact carrying its PNG as a data
  URL, so the UI shows it with no MLflow server).
- A stages artifact: "N computed, M reused", and per stage its key, status, time and the
  flow run that computed the artifact (linked), so a cached stage says where it came from.
- On each reused stage's own task run, a note naming its key, sha256 and producer.

Artifact keys are per spec, so a deployment's runs are versions of one artifact.
"""
from __future__ import annotations

import base64
import io
import re
from functools import lru_cache
from typing import Any

from pai_core.executor import Job, Outcome
from pai_core.plan import Node
from pai_core.store import Ref, Store


def slug(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", name.lower())).strip("-") or "run"


@lru_cache(maxsize=256)
def _flow_run_name(flow_run_id: str) -> str | None:
    from uuid import UUID

    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(UUID(flow_run_id)).name
    except Exception:  # noqa: BLE001 - a run of another server, or deleted: named by id
        return None


def producer(ref: Ref) -> str:
    """Markdown naming the flow run that computed the artifact, linked when a UI exists."""
    from flows.tracking import flow_run_url

    fid = ref.info.flow_run_id
    if not fid:
        return "outside Prefect (a notebook or `run_specs`)"
    name = _flow_run_name(fid) or fid[:8]
    url = flow_run_url(fid)
    return f"[{name}]({url})" if url else f"{name} (`{fid}`)"


def publish_reused(task_run_id: Any, node: Node, ref: Ref) -> None:
    """A note on a reused stage's task run: its key, its sha256, and the run that computed it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.runtime import flow_run

    if task_run_id is None:
        return
    secs = f" in {ref.info.seconds:.1f} s" if ref.info.seconds else ""
    host = (ref.info.computed_by or {}).get("host")
    md = (f"**Reused** `{node.stage}/{node.key}` from the verified store (sha256 `{ref.sha256}`).\n\n"
          f"Computed by flow run {producer(ref)}{secs}{f' on {host}' if host else ''}.")
    try:
        with get_client(sync_client=True) as client:
            client.create_artifact(ArtifactCreate(type="markdown", data=md, description=f"reused {node.stage} stage",
                                                  task_run_id=task_run_id, flow_run_id=flow_run.get_id()))
    except Exception:  # noqa: BLE001 - a note, never a reason to fail the run
        pass


def round_rows(job: Job, out: Outcome) -> list[dict[str, Any]]:
    status = {s["key"]: s["status"] for s in out.stages}
    rows = []
    for rnd, group in zip(job.plan.rounds, job.plan.nodes_by_round()):
        ref = out.refs.get(rnd.evaluate.key)
        if ref is None:
            continue
        ev = ref.info
        computed = sum(status.get(n.key) == "computed" for n in group)
        rows.append({"round": rnd.name, "target sparsity": round(1 - rnd.density, 6) if rnd.density == rnd.density
                     else None, "sparsity": round(ev.sparsity, 6), "val acc": round(ev.val_acc, 4),
                     "test acc": round(ev.test_acc, 4),
                     "test acc @ best val": round(ev.best.test_acc, 4) if ev.best else None,
                     **instability_cells(rnd, out.refs),
                     "stages": f"{computed} computed, {len(group) - computed} reused",
                     "status": "computed" if computed else "reused"})
    return rows


def instability_cells(rnd: Any, refs: dict[str, Any]) -> dict[str, float]:
    """An instability row's barriers ({"instability test": 0.012}); nothing for other rounds."""
    ref = refs.get(rnd.analysis.key) if rnd.analysis is not None else None
    return {f"instability {s}": round(v, 4) for s, v in ref.info.instability.items()} if ref is not None else {}


def stages_markdown(out: Outcome, flow_run_id: str | None, mlflow_run: tuple[str, str] | None = None) -> str:
    lines = [f"**{out.computed} computed, {out.reused} reused** stages in this run.", ""]
    if mlflow_run:
        from flows.env import local_tracking, mlflow_ui_url, tracking_uri

        exp, run = mlflow_run
        lines += [f"MLflow: [this run's metrics and rounds]({mlflow_ui_url(exp, run)})" if not local_tracking()
                  else f"MLflow run `{run}` in `{tracking_uri()}`", ""]
    lines += ["| stage | round | status | key | seconds | computed by |", "|---|---|---|---|---:|---|"]
    for s in out.stages:
        ref = out.refs.get(s["key"])
        by = "this run" if s["status"] == "computed" or (ref and ref.info.flow_run_id == flow_run_id) \
            else (producer(ref) if ref else "")
        secs = f"{ref.info.seconds:.1f}" if ref and ref.info.seconds else ""
        lines.append(f"| {s['role']} | {s['round']} | {s['status']} | `{s['stage']}/{s['key'][:16]}` | {secs} | {by} |")
    return "\n".join(lines) + "\n"


def accuracy_png(spec: Any, store: Store) -> bytes | None:
    """This spec's accuracy-vs-density plot as PNG bytes (None when no pruned round finished)."""

    from pai_core.report import accuracy_plot, collect

    points, _ = collect([spec], store)
    if not points:
        return None
    fig = accuracy_plot(points)
    fig.savefig(buf := io.BytesIO(), format="png", dpi=150)
    return buf.getvalue()


def publish_results(job: Job, out: Outcome, store: Store, flow_run_id: str | None,
                    mlflow_run: tuple[str, str] | None = None) -> dict[str, str]:
    """The run's table, plot and stages artifacts (see the module docstring); returns their keys."""
    from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

    spec, key = job.spec, slug(f"pai-{job.spec.name}")
    keys = {"table": f"{key}-results", "stages": f"{key}-stages"}
    create_table_artifact(round_rows(job, out), key=keys["table"],
                          description=f"{spec.name} ({spec.flow}): results per round; "
                                      f"{out.computed} stages computed, {out.reused} reused")
    create_markdown_artifact(stages_markdown(out, flow_run_id, mlflow_run), key=keys["stages"],
                             description=f"{spec.name}: which stages ran and which were reused, by key")
    if (png := accuracy_png(spec, store)) is not None:
        keys["plot"] = f"{key}-accuracy"
        create_image_artifact("data:image/png;base64," + base64.b64encode(png).decode(), key=keys["plot"],
                              description=f"{spec.name}: test accuracy vs density (log)")
    return keys
