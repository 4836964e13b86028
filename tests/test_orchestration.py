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
from pai_core.criteria import criterion_names
from pai_core.paradigms import build_plan
from pai_core.spec_io import parse_spec

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
        for field, value in (("schedule", "sometimes"), ("criterion", "snipp"), ("rate", 1.5)):
            bad = json.loads(json.dumps(dep.parameters["spec"]))
            bad["prune"][field] = value
            with pytest.raises(Exception, match=f"spec.prune.{field}"):
                client.create_flow_run_from_deployment(dep.id, parameters={"spec": bad})
        assert not _manual_runs(client, dep.id), "a refused run was created"

        changed = json.loads(json.dumps(dep.parameters["spec"]))
        changed["prune"]["rate"] = 0.5
        run = client.create_flow_run_from_deployment(dep.id, parameters={"spec": changed})
        run = _wait_final(client, run.id)
        assert run.state.name == "Completed", run.state
        assert "prune.rate=0.5" in run.tags  # the deployment's run list shows what this run changed
        names = sorted(t.name for t in client.read_task_runs(
            flow_run_filter=_by_flow_run(run.id)))
    stack["runs"]["first"] = (str(run.id), run.name, names)
    assert "init" in names and "pretrain" in names and "retrain · round 2" in names

    mlflow, exp, parent = _mlflow_parent(stack, str(run.id))
    assert parent.data.params["prune.rate"] == "0.5"  # the changed parameter reached the flow
    assert parent.info.run_name == "tiny_lth [prune.rate=0.5]"  # ...and names the run
    assert parent.data.metrics["final_sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert 0 <= parent.data.metrics["final_test_acc"] <= parent.data.metrics["best_test_acc"] <= 1
    assert parent.data.tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{run.id}")
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


def test_a_rerun_of_a_finished_spec_adds_no_nested_mlflow_runs(stack):
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(stack["mlflow"])
    exp = mlflow.get_experiment_by_name("pai-e2e")
    nested = lambda: {r.info.run_id for r in mlflow.search_runs([exp.experiment_id], "tags.`pai.round` != ''")}  # noqa: E731
    before = nested()
    with _client(stack) as client:
        dep = client.read_deployment_by_name(DEPLOYMENT)
        changed = json.loads(json.dumps(dep.parameters["spec"]))
        changed["prune"]["rate"] = 0.5  # exactly the run the first test made
        run = _wait_final(client, client.create_flow_run_from_deployment(dep.id, parameters={"spec": changed}).id)
        n = len(build_plan(parse_spec(changed)).nodes)
        assert run.state.name == "Completed" and run.state.message == f"0 stages computed, {n} reused", run.state
    assert nested() == before
    _, _, parent = _mlflow_parent(stack, str(run.id))
    assert parent.data.tags["pai.all_reused"] == "true" and parent.info.run_name == "tiny_lth [prune.rate=0.5]"
    assert {parent.data.tags[f"pai.round.{i}.run_id"] for i in range(3)} <= before  # linked, not logged again


def test_report_is_published_to_mlflow_and_prefect(stack):
    # The spec of the run triggered above, with its changed rate: the report reads the store.
    ran = stack["raw"] | {"prune": {**stack["raw"]["prune"], "rate": 0.5}}
    path = stack["home"].parent / "tiny_lth_rate05.yaml"
    path.write_text(yaml.safe_dump(ran))
    out = _pai(stack["env"], "report", str(path))
    assert "| LTH |" in out.stdout and "| dense |" in out.stdout
    # The same report from the deployment's spec file plus the override, and from the flow run itself.
    same = [_pai(stack["env"], "report", str(stack["spec_path"]), "prune.rate=0.5", "--name", "tiny_lth").stdout,
            _pai(stack["env"], "report", "--flow-run", stack["runs"]["first"][0], "--name", "tiny_lth").stdout]
    table = lambda text: [line for line in text.splitlines() if line.startswith("|")]  # noqa: E731
    assert table(out.stdout) and all(table(o) == table(out.stdout) for o in same), same
    with _client(stack) as client:
        stack["artifacts"] = {a.key: str(a.id) for a in client.read_artifacts()}
    assert {"pai-report-tiny-lth", "pai-report-tiny-lth-accuracy", "pai-report-tiny-lth-layers"} <= set(
        stack["artifacts"])
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(stack["mlflow"])
    exp = mlflow.get_experiment_by_name("pai-e2e")
    runs = mlflow.search_runs([exp.experiment_id], "tags.`pai.flow` = 'report'")
    assert len(runs) == 3  # one per `pai report` above
    run = runs[0]
    assert {a.path for a in mlflow.list_artifacts(run.info.run_id, "report")} == {
        "report/report.md",
        *(f"report/{plot}.{ext}" for plot in ("accuracy", "layers", "flops") for ext in ("png", "pdf", "svg"))}


def test_browser_sees_deployment_run_stages_report_and_mlflow(stack):
    """Headless Debian Chromium through chromium-driver; screenshots in test-outputs/screenshots.

    The form, the run's own results, the MLflow runs table sorted by accuracy, and a training
    round's MLflow run drawing its curves while it trains (that run is left for the crash test)."""
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        if os.environ.get("PAI_REQUIRE_BROWSER"):
            pytest.fail("PAI_REQUIRE_BROWSER is set but Debian's chromium / chromium-driver are not installed")
        pytest.skip("needs Debian's chromium and chromium-driver (apt install chromium chromium-driver)")
    from mlflow.tracking import MlflowClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from selenium.webdriver.support.ui import WebDriverWait

    from browser import (check_live_run, check_mlflow_ui, check_prefect_ui, check_run_artifacts, check_run_form,
                         chromium, search_list, sort_mlflow_runs, wait_shown)

    run_id, run_name, _ = stack["runs"]["first"]
    ui = stack["prefect"].removesuffix("/api")
    mlflow = MlflowClient(stack["mlflow"])
    exp = mlflow.get_experiment_by_name("pai-e2e")
    with _client(stack) as client:
        runs_before = len(_manual_runs(client, stack["deployment_id"]))
        own = {a.key: str(a.id) for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))) if a.key}
    with chromium(SHOTS) as driver:
        check_prefect_ui(driver, ui, "tiny_lth", run_id, run_name,
                         ["init", "pretrain", "retrain · round 1", "evaluate · round 2"], SHOTS)
        # The Custom Run form: LTH's sections only, registry names as dropdowns, and an unknown
        # criterion (forced into the dropdown) refused at its field; no flow run is created.
        check_run_form(driver, ui, stack["deployment_id"],
                       shown=["spec", "Seed (Optional)", "Model", "Train", "Prune", "Rewind Iter (Optional)"],
                       not_shown=["Gradual (Optional)", "Selection", "Dynamic", "Sanity", "Early Bird (Optional)"],
                       enum=("magnitude", criterion_names()), bad="snipp",
                       error=f"'snipp' is not one of {criterion_names()}", shots=SHOTS)
        # The finished run's own results: table and plot in its Artifacts tab.
        check_run_artifacts(driver, ui, run_id, "pai-tiny-lth-results", "pai-tiny-lth-accuracy", own,
                            ["round", "test acc", "dense", "round 2", "computed"], SHOTS)
        driver.get(f"{ui}/artifacts/artifact/{stack['artifacts']['pai-report-tiny-lth']}")  # `pai report`'s table
        wait_shown(driver, ["LTH", "dense"], SHOTS, "prefect-report")
        driver.save_screenshot(str(SHOTS / "prefect-report.png"))
        driver.get(f"{ui}/artifacts/artifact/{stack['artifacts']['pai-report-tiny-lth-accuracy']}")  # the plot
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return [...document.images].some(i => i.src.startsWith('data:image/png') && i.naturalWidth > 500)"))
        driver.save_screenshot(str(SHOTS / "prefect-report-plot.png"))
        check_mlflow_ui(driver, stack["mlflow"], "pai-e2e", "tiny_lth [prune.rate=0.5]", [], SHOTS)
        _, _, parent = _mlflow_parent(stack, run_id)
        (child,) = mlflow.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                                           "and attributes.run_name = 'round 1'")
        driver.get(f"{stack['mlflow']}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}")
        wait_shown(driver, ["round 1"], SHOTS, "mlflow-round")
        search_list(driver, ["test_acc", "sparsity"], SHOTS, "mlflow-round")  # its metrics
        driver.save_screenshot(str(SHOTS / "mlflow-round.png"))
        # Parent runs carry summary metrics: the runs table sorts by test accuracy.
        sort_mlflow_runs(driver, stack["mlflow"], exp.experiment_id, "final_test_acc",
                         lambda rid: mlflow.get_run(rid).data.metrics.get("final_test_acc"), SHOTS)

        # Live: a long retrain's round run exists, and draws its curves, before it finishes.
        with _client(stack) as client:
            assert len(_manual_runs(client, stack["deployment_id"])) == runs_before  # the refused form made none
            live_flow_run = client.create_flow_run_from_deployment(
                stack["deployment_id"], parameters={"spec": _long_retrain(stack["raw"])})
        stack["long_run"] = str(live_flow_run.id)
        live = _live_round_run(stack, mlflow, exp.experiment_id, str(live_flow_run.id), min_epochs=2)
        check_live_run(driver, stack["mlflow"], exp.experiment_id, live.info.run_id, "round 1", "val_acc", SHOTS)
        after = mlflow.get_run(live.info.run_id)
        epochs = mlflow.get_metric_history(live.info.run_id, "epoch/val_acc")
        assert after.info.status == "RUNNING" and len(epochs) >= 2, (after.info.status, len(epochs))
    for shot in ("prefect-deployments", "prefect-flow-run", "prefect-run-form", "prefect-run-form-refused",
                 "prefect-run-artifacts", "prefect-run-results", "prefect-run-plot", "prefect-report",
                 "prefect-report-plot", "mlflow-experiment", "mlflow-run", "mlflow-round", "mlflow-sorted",
                 "mlflow-live-training"):
        assert (SHOTS / f"{shot}.png").stat().st_size > 10_000


def _long_retrain(raw: dict) -> dict:
    """One round whose retraining is long enough to watch live and to kill part-way."""
    spec = json.loads(json.dumps(raw))
    spec["prune"]["rounds"] = 1
    spec["retrain"] = {**spec["train"], "epochs": 1000}
    return spec


def _live_round_run(stack, mlflow, experiment_id: str, flow_run_id: str, min_epochs: int, timeout: float = 240) -> Any:
    """The RUNNING MLflow run of round 1 of that flow run, once it has `min_epochs` epochs of metrics."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parents = mlflow.search_runs([experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}' "
                                                      "and attributes.status = 'RUNNING'")
        for p in parents:
            for run in mlflow.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{p.info.run_id}' and "
                                                           "attributes.run_name = 'round 1' and "
                                                           "attributes.status = 'RUNNING'"):
                if len(mlflow.get_metric_history(run.info.run_id, "epoch/val_acc")) >= min_epochs:
                    return run
        time.sleep(0.3)
    raise AssertionError(f"no live round run with {min_epochs} epochs for flow run {flow_run_id} in {timeout} s")


def _manual_runs(client, deployment_id) -> list:
    """The deployment's flow runs other than those its cron schedule made."""
    return [r for r in client.read_flow_runs(deployment_filter=_by_deployment(deployment_id)) if not r.auto_scheduled]


def _by_deployment(deployment_id) -> Any:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))


def _by_flow_run(run_id) -> Any:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))


def test_crashed_run_retried_like_the_ui_resumes_at_first_unfinished_stage(stack):
    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    from uuid import UUID

    store = stack["home"] / "store"
    with _client(stack) as client:
        run = client.read_flow_run(UUID(stack["long_run"])) if "long_run" in stack else None  # watched live
        if run is None or (run.state and run.state.is_final()):
            dep = client.read_deployment_by_name(DEPLOYMENT)
            run = client.create_flow_run_from_deployment(dep.id, parameters={"spec": _long_retrain(stack["raw"])})
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
    killed = next(r for r in attempts if r.info.status == "KILLED")
    (dead_round,) = mlflow.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{killed.info.run_id}'")
    assert dead_round.info.status == "KILLED"  # its live round run too
    (done_round,) = mlflow.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                                            "and attributes.run_name = 'round 1'")
    steps = [m.step for m in mlflow.get_metric_history(done_round.info.run_id, "epoch/val_acc")]
    assert len(steps) == len(set(steps)) == 1000  # live after the resume, the rest from the history: each once
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
