"""Deployments built from the example specs: configs/ stays the single source of truth.

Each YAML becomes one deployment of its paradigm's flow whose one parameter, `spec`, is the
validated spec itself (a sweep file: the `sweep` flow, parameter `sweep`). Prefect derives
the parameter's JSON schema from the pydantic model, so the UI's "Run" form shows every
field with its allowed values and the server checks a custom run against it; the flow
validates it again with pydantic before any stage runs.

The entrypoint is a module path (`flows.lottery_ticket:lottery_ticket`), not a file: a
worker imports the installed package, so there is no code to upload or pull.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.flows import EntrypointType
from prefect.workers.process import ProcessWorker

from flows import FLOWS
from flows.sweep import sweep as sweep_flow
from pai_core.spec_io import load_spec
from pai_core.sweep import is_sweep_file, load_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_POOL = "local-cpu"


@dataclass(frozen=True)
class Deployed:
    name: str          # "<flow>/<deployment>", what `prefect deployment run` takes
    id: str
    path: str
    schedule: str | None


def spec_files(root: Path = CONFIGS) -> list[Path]:
    """Every spec under configs/: experiments, and the sweeps in configs/sweeps/."""
    return sorted(root.rglob("*.yaml"))


def _load(path: Path) -> tuple[str, str, dict]:
    """(flow name, deployment name, parameters) for an experiment or a sweep file."""
    if is_sweep_file(path):
        sw = load_sweep(path)
        return "sweep", sw.name, {"sweep": sw.model_dump(mode="json")}
    spec = load_spec(path)
    return spec.flow, spec.name, {"spec": spec.model_dump(mode="json")}


def description(path: Path) -> str:
    """The spec's leading comment block: why it exists, in its author's words."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return " ".join(lines) or f"pai-flow spec {path.name}"


def require_server() -> str:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise RuntimeError("deployments need a Prefect server: run `pai server up` (or set PREFECT_API_URL)")
    return url


def ensure_pool(name: str) -> None:
    """A process work pool, created with Prefect's default job template if missing."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template(),
                description="pai-flow: flow runs as subprocesses of a worker on this machine"))


def deploy(paths: list[Path], pool: str = DEFAULT_POOL, cron: str | None = None, timezone: str = "UTC",
           paused: bool = False) -> list[Deployed]:
    """Validate every spec first (nothing is registered if one is wrong), then deploy each."""
    specs = [(p, *_load(p)) for p in paths]  # a bad spec is refused before the server is touched
    require_server()
    names = [f"{flow}/{name}" for _, flow, name, _ in specs]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise RuntimeError(f"two specs would share the deployment name {dup[0]}: give one a different `name`")
    ensure_pool(pool)
    out = []
    for path, flow_name, name, parameters in specs:  # name: the file's stem unless the spec names itself
        schedules = None
        if cron:
            from prefect.schedules import Cron

            schedules = [Cron(cron, timezone=timezone)]
        flow = sweep_flow if flow_name == "sweep" else FLOWS[flow_name]
        dep = flow.to_deployment(
            name=name, parameters=parameters, schedules=schedules, paused=paused,
            description=description(path), tags=["pai-flow", flow_name], work_pool_name=pool,
            entrypoint_type=EntrypointType.MODULE_PATH, enforce_parameter_schema=True)
        out.append(Deployed(f"{flow_name}/{name}", str(dep.apply()), str(path), cron))
    return out
