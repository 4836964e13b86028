"""`pai server` safety without starting servers: a recorded pid is only signalled while it is
still the process `up` started; a taken port is refused; deploy refuses bad specs first."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest
from typer.testing import CliRunner

from flows import servers
from flows.cli import app


def _record(home, name: str, pid: int, created: float) -> None:
    (home / "servers").mkdir(parents=True, exist_ok=True)
    (home / "servers" / "state.json").write_text(json.dumps({name: {
        "name": name, "pid": pid, "created": created, "url": "http://127.0.0.1:9/api", "log": "x", "argv": []}}))


def test_a_reused_pid_is_never_signalled(pai_home):
    # This very process, recorded with another start time: as if the server died and the
    # system gave its pid to us. `down` must not kill it; `status` says it is not running.
    me = psutil.Process(os.getpid())
    _record(pai_home, "prefect", me.pid, me.create_time() - 3600)
    assert servers.status()["prefect"]["alive"] is False
    assert servers.down() == []
    assert me.is_running() and not (pai_home / "servers" / "state.json").exists()


def test_down_stops_the_recorded_process_and_its_children(pai_home):
    # A stand-in "server" in its own session with a child, like `prefect server start`.
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"],
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
        time.sleep(0.1)
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(family) == 2
    _record(pai_home, "mlflow", proc.pid, family[0].create_time())
    assert servers.down() == ["mlflow"]
    proc.wait(10)
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive


def test_a_port_taken_by_someone_else_is_refused(pai_home):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(servers.ServerError, match=f"port {port} on 127.0.0.1 is taken"):
            servers.up(prefect_port=port, mlflow_port=port, timeout=5)
    assert servers.status() == {}


def test_deploy_refuses_a_bad_spec_before_needing_a_server(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("flow: lottery_ticket\nmodel: {name: lenet_300_100}\ndata: {dataset: synthetic}\n"
                   "train: {epochs: 1, lr: 0.1}\nprune: {schedule: iterative, rate: 1.5}\n")
    out = CliRunner().invoke(app, ["deploy", str(bad)])
    assert out.exit_code == 2 and "prune.rate" in out.output
    good = tmp_path / "good.yaml"
    good.write_text(bad.read_text().replace("1.5", "0.5"))
    out = CliRunner().invoke(app, ["deploy", str(good)])
    assert out.exit_code == 2 and "pai server up" in out.output


def test_up_prints_both_ui_addresses_in_full():
    from flows.servers import ui_urls

    state = {"prefect": {"url": "http://127.0.0.1:4200/api"}, "mlflow": {"url": "http://127.0.0.1:5000"}}
    assert ui_urls(state) == {"Prefect UI": "http://127.0.0.1:4200/",
                              "MLflow UI": "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"}
    assert ui_urls({}) == {}
