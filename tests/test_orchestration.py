"""Real orchestration, end to end: `pai server up` starts a Prefect server, an MLflow server and
a process worker; a tiny spec is deployed, triggered with a changed parameter through the
Prefect API, tracked in MLflow, crashed by SIGKILL and retried exactly as the UI's Retry
button does; `pai server down` then stops every process it started.

One stack serves the whole module (starting it costs ~20-40 s); the tests run in file order.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import yaml

from conftest import tiny_raw

pytestmark = pytest.mark.slow
PAI = str(Path(sys.executable).parent / "pai")
POOL = "pai-e2e"
DEPLOYMENT = "lottery_ticket/tiny_lth"
SHOTS = Path(__file__).resolve().parents[1] / "test-outputs" / "screenshots"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pai(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([PAI, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"pai {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Any:
    home = tmp_path_factory.mktemp("orchestration") / "pai-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {"PAI_HOME": str(home), "COLUMNS": "200"}
    ports = {"prefect": _free_port(), "mlflow": _free_port()}
    _pai(env, "server", "up", "--prefect-port", str(ports["prefect"]), "--mlflow-port", str(ports["mlflow"]),
         "--worker", POOL)
    state = json.loads((home / "servers" / "state.json").read_text())
    procs = {name: psutil.Process(s["pid"]) for name, s in state.items()}
    family = [p for proc in procs.values() for p in [proc, *proc.children(recursive=True)]]
    spec_path = home.parent / "tiny_lth.yaml"
    raw = tiny_raw("lottery_ticket") | {"name": "tiny_lth", "experiment": "pai-e2e"}
    spec_path.write_text("# A tiny LTH spec for the end-to-end test.\n" + yaml.safe_dump(raw))
    info = {"home": home, "env": env, "state": state, "spec_path": spec_path, "raw": raw, "runs": {},
            "prefect": state["prefect"]["url"], "mlflow": state["mlflow"]["url"]}
    try:
        yield info
    finally:
        down = subprocess.run([PAI, "server", "down"], env=env, capture_output=True, text=True, timeout=120)
        family += [p for p in info.get("flow_procs", [])]
        _, alive = psutil.wait_procs(family, timeout=30)
        for p in alive:  # never leave anything behind, even when the test fails
            p.kill()
        assert down.returncode == 0, down.stderr
        assert not alive, f"still running after `pai server down`: {[p.pid for p in alive]}"


@contextmanager
def _client(stack) -> Iterator[Any]:
    """A Prefect client for the stack's server, without touching this process's settings."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack["prefect"]}), get_client(sync_client=True) as client:
        yield client


def _wait_final(client, run_id, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state and run.state.is_final():
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} not finished after {timeout} s: {run.state}")


def _mlflow_parent(stack, flow_run_id: str) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack["mlflow"])
    exp = client.get_experiment_by_name("pai-e2e")
    runs = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}' "
                                                   "and attributes.status = 'FINISHED'")
    assert runs, f"no finished MLflow run tagged with flow run {flow_run_id}"
    return client, exp, runs[0]


def test_deploy_with_schedule_then_trigger_a_changed_parameter(stack):
    out = _pai(stack["env"], "deploy", str(stack["spec_path"]), "--pool", POOL, "--cron", "0 3 * * *")
    assert DEPLOYMENT in out.stdout
    with _client(stack) as client:
        dep = client.read_deployment_by_name(DEPLOYMENT)
        stack["deployment_id"] = str(dep.id)
        assert dep.work_pool_name == POOL and dep.entrypoint == "flows.lottery_ticket.lottery_ticket"
        assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
        # The parameter is the pydantic spec: the UI renders a form from this schema.
        schema = dep.parameter_openapi_schema
        assert schema["required"] == ["spec"] and "LotteryTicketSpec" in json.dumps(schema)
        assert dep.parameters["spec"]["prune"]["rate"] == 0.2

        # The server checks a custom run against that schema before any flow run exists.
        bad = json.loads(json.dumps(dep.parameters["spec"]))
        bad["prune"]["schedule"] = "sometimes"
        with pytest.raises(Exception, match="spec.prune.schedule"):
            client.create_flow_run_from_deployment(dep.id, parameters={"spec": bad})

        changed = json.loads(json.dumps(dep.parameters["spec"]))
        changed["prune"]["rate"] = 0.5
        run = client.create_flow_run_from_deployment(dep.id, parameters={"spec": changed})
        run = _wait_final(client, run.id)
        assert run.state.name == "Completed", run.state
        names = sorted(t.name for t in client.read_task_runs(
            flow_run_filter=_by_flow_run(run.id)))
    stack["runs"]["first"] = (str(run.id), run.name, names)
    assert "init" in names and "pretrain" in names and "retrain · round 2" in names

    mlflow, exp, parent = _mlflow_parent(stack, str(run.id))
    assert parent.data.params["prune.rate"] == "0.5"  # the changed parameter reached the flow
    children = mlflow.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["dense", "round 1", "round 2"]
    for child in children:
        assert 0 <= child.data.metrics["test_acc"] <= 1
        artifacts = {a.path for a in mlflow.list_artifacts(child.info.run_id)}
        assert artifacts == {"sparsity_report.json"}  # weights and masks stay in the store, named by key + sha256
        assert len(child.data.tags["pai.weights_sha256"]) == 64
        if child.info.run_name != "dense":
            assert len(child.data.tags["pai.mask_sha256"]) == 64
            assert child.data.metrics["sparsity"] == pytest.approx(1 - 0.5 ** int(child.info.run_name[-1]), abs=1e-3)


def test_report_is_published_to_mlflow_and_prefect(stack):
    # The spec of the run triggered above, with its changed rate: the report reads the store.
    ran = stack["raw"] | {"prune": {**stack["raw"]["prune"], "rate": 0.5}}
    path = stack["home"].parent / "tiny_lth_rate05.yaml"
    path.write_text(yaml.safe_dump(ran))
    out = _pai(stack["env"], "report", str(path))
    assert "| LTH |" in out.stdout and "| dense |" in out.stdout
    with _client(stack) as client:
        stack["artifacts"] = {a.key: str(a.id) for a in client.read_artifacts()}
    assert {"pai-report-tiny-lth", "pai-report-tiny-lth-accuracy", "pai-report-tiny-lth-layers"} <= set(
        stack["artifacts"])
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(stack["mlflow"])
    exp = mlflow.get_experiment_by_name("pai-e2e")
    (run,) = mlflow.search_runs([exp.experiment_id], "tags.`pai.flow` = 'report'")
    assert {a.path for a in mlflow.list_artifacts(run.info.run_id, "report")} == {
        "report/report.md", *(f"report/{plot}.{ext}" for plot in ("accuracy", "layers") for ext in ("png", "pdf", "svg"))}


def test_browser_sees_deployment_run_stages_report_and_mlflow(stack):
    """Headless Debian Chromium through chromium-driver; screenshots in test-outputs/screenshots."""
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        if os.environ.get("PAI_REQUIRE_BROWSER"):
            pytest.fail("PAI_REQUIRE_BROWSER is set but Debian's chromium / chromium-driver are not installed")
        pytest.skip("needs Debian's chromium and chromium-driver (apt install chromium chromium-driver)")
    from browser import check_mlflow_ui, check_prefect_ui, chromium, search_list, wait_shown
    from selenium.webdriver.support.ui import WebDriverWait

    run_id, run_name, _ = stack["runs"]["first"]
    ui = stack["prefect"].removesuffix("/api")
    with chromium(SHOTS) as driver:
        check_prefect_ui(driver, ui, "tiny_lth", run_id, run_name,
                         ["init", "pretrain", "retrain · round 1", "evaluate · round 2"], SHOTS)
        # The deployment's Custom run page: a form generated from the spec's pydantic schema.
        driver.get(f"{ui}/deployments/deployment/{stack['deployment_id']}/run")
        wait_shown(driver, ["spec", "Flow", "Seed (Optional)", "Model", "Train", "Prune"], SHOTS,
                   "prefect-run-form")
        driver.save_screenshot(str(SHOTS / "prefect-run-form.png"))
        driver.get(f"{ui}/artifacts/artifact/{stack['artifacts']['pai-report-tiny-lth']}")  # the table
        wait_shown(driver, ["LTH", "dense"], SHOTS, "prefect-report")
        driver.save_screenshot(str(SHOTS / "prefect-report.png"))
        driver.get(f"{ui}/artifacts/artifact/{stack['artifacts']['pai-report-tiny-lth-accuracy']}")  # the plot
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return [...document.images].some(i => i.src.startsWith('data:image/png') && i.naturalWidth > 500)"))
        driver.save_screenshot(str(SHOTS / "prefect-report-plot.png"))
        check_mlflow_ui(driver, stack["mlflow"], "pai-e2e", "tiny_lth", [], SHOTS)  # experiment, parent run
        mlflow, exp, parent = _mlflow_parent(stack, run_id)
        (child,) = mlflow.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                                           "and attributes.run_name = 'round 1'")
        driver.get(f"{stack['mlflow']}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}")
        wait_shown(driver, ["round 1"], SHOTS, "mlflow-round")
        search_list(driver, ["test_acc", "sparsity"], SHOTS, "mlflow-round")  # its metrics
        driver.save_screenshot(str(SHOTS / "mlflow-round.png"))
    for shot in ("prefect-deployments", "prefect-flow-run", "prefect-run-form", "prefect-report", "prefect-report-plot",
                 "mlflow-experiment", "mlflow-run",
                 "mlflow-round"):
        assert (SHOTS / f"{shot}.png").stat().st_size > 10_000


def _by_flow_run(run_id) -> Any:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))


def test_crashed_run_retried_like_the_ui_resumes_at_first_unfinished_stage(stack):
    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    raw = json.loads(json.dumps(stack["raw"]))
    raw["train"]["epochs"] = 30  # long enough to kill round 1's retrain part-way
    store = stack["home"] / "store"
    with _client(stack) as client:
        dep = client.read_deployment_by_name(DEPLOYMENT)
        run = client.create_flow_run_from_deployment(dep.id, parameters={"spec": raw})
        deadline = time.monotonic() + 240
        while not list((store / "train").glob("*.ckpt.pt")) or not _retrain_started(client, run.id):
            assert time.monotonic() < deadline, "round 1's retrain never wrote a checkpoint"
            time.sleep(0.2)
        pid = int(str(client.read_flow_run(run.id).infrastructure_pid).rsplit(":", 1)[-1])
        proc = psutil.Process(pid)
        stack["flow_procs"] = [proc, *proc.children(recursive=True)]
        os.kill(pid, signal.SIGKILL)
        crashed = _wait_final(client, run.id, 120)
        assert crashed.state.type == StateType.CRASHED, crashed.state
        # The run's executor reports the crash at once; the worker's own report of the dead
        # process follows seconds later and would overwrite a retry made before it, so retry
        # (as a user would) once the worker has had its say.
        _wait_worker_log(stack, "prefect.flow_runs.worker", "Check whether the flow run exceeded")

        # The UI's Retry button: set_state(scheduled, "AwaitingRetry", "Retry from the UI"), not forced.
        client.set_flow_run_state(run.id, State(type=StateType.SCHEDULED, name="AwaitingRetry",
                                                message="Retry from the UI"), force=False)
        retried = _wait_final(client, run.id)
        assert retried.state.name == "Completed", retried.state
        assert retried.run_count >= 2
        logs = " ".join(log.message for log in client.read_logs(log_filter=_logs_of(run.id)))
    assert "resuming from checkpoint" in logs
    mlflow, exp, parent = _mlflow_parent(stack, str(run.id))
    attempts = mlflow.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{run.id}'")
    assert sorted(r.info.status for r in attempts) == ["FINISHED", "KILLED"]  # the crashed one is closed
    summary = json.loads(Path(mlflow.download_artifacts(parent.info.run_id, "summary.json")).read_text())
    status = {(s["role"], s["round"]): s["status"] for s in summary["stages"]}
    # Everything finished before the kill is reused; round 1's retrain resumed from its checkpoint.
    for stage in [("init", "dense"), ("pretrain", "dense"), ("evaluate", "dense"), ("score", "round 1"),
                  ("mask", "round 1")]:
        assert status[stage] == "reused", summary["stages"]
    assert status[("retrain", "round 1")] == "computed"


def _wait_worker_log(stack, *needles: str, timeout: float = 60) -> None:
    log = Path(stack["state"]["worker"]["log"])
    deadline = time.monotonic() + timeout
    while not any(all(n in line for n in needles) for line in log.read_text(errors="replace").splitlines()):
        assert time.monotonic() < deadline, f"worker never logged {needles}"
        time.sleep(0.5)


def _retrain_started(client, run_id) -> bool:
    return any(t.name.startswith("retrain") for t in client.read_task_runs(flow_run_filter=_by_flow_run(run_id)))


def _logs_of(run_id) -> Any:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
