"""Local Prefect and MLflow servers, and a process worker, as background processes.

`up` starts each in its own session (so the processes it spawns belong to its group),
waits until it answers, and records pid and start time in PAI_HOME/servers/state.json.
`down` stops exactly those: SIGTERM to the group, SIGKILL after a grace period (a process
started by Prefect may ignore SIGTERM, DESIGN.md §6). The start time is checked first, so
a pid the system has since handed to another process is never signalled.

No Prefect import here: `pai server status` answers in well under a second.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from flows.env import DEFAULTS
from pai_core.paths import pai_home

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000}
# pai-flow's defaults, so a worker's flow runs get them before Prefect configures logging
QUIET = {**DEFAULTS, "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}


class ServerError(RuntimeError):
    """A server could not be started or reached; the message says what to do."""


@dataclass(frozen=True)
class Started:
    name: str
    pid: int
    created: float
    url: str
    log: str
    argv: list[str]


def state_dir() -> Path:
    return pai_home() / "servers"


def _state_file() -> Path:
    return state_dir() / "state.json"


def _bin(name: str) -> str:
    """The console script installed beside this interpreter (the project's venv)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def prefect_api_url(host: str, port: int) -> str:
    return f"http://{host}:{port}/api"


def _answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except Exception:
        return False


def _health_url(name: str, url: str) -> str:
    return f"{url}/health"  # Prefect: <api>/health; MLflow: <root>/health


def _port_busy(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host if host != "0.0.0.0" else "127.0.0.1", port)) == 0


def read_state() -> dict[str, dict[str, Any]]:
    try:
        return json.loads(_state_file().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(state: dict[str, dict[str, Any]]) -> None:
    state_dir().mkdir(parents=True, exist_ok=True)
    tmp = _state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, _state_file())


def _process(entry: dict[str, Any]) -> psutil.Process | None:
    """The recorded process if it is still the one we started (same pid and start time)."""
    try:
        p = psutil.Process(entry["pid"])
        return p if abs(p.create_time() - entry["created"]) < 1.0 and p.is_running() else None
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
        return None


def _spawn(name: str, argv: list[str], env: dict[str, str], url: str) -> Started:
    state_dir().mkdir(parents=True, exist_ok=True)
    log = state_dir() / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **QUIET, **env}, start_new_session=True)
    return Started(name, proc.pid, psutil.Process(proc.pid).create_time(), url, str(log), argv)


def _wait(started: Started, ready: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if _process(started.__dict__) is None:
            tail = Path(started.log).read_text(errors="replace").splitlines()[-15:]
            raise ServerError(f"{started.name} exited while starting; last lines of {started.log}:\n" + "\n".join(tail))
        time.sleep(0.5)
    raise ServerError(f"{started.name} did not answer at {started.url} within {timeout:.0f} s; see {started.log}")


def up(host: str = DEFAULT_HOST, prefect_port: int = DEFAULT_PORTS["prefect"],
       mlflow_port: int = DEFAULT_PORTS["mlflow"], worker_pool: str | None = None,
       timeout: float = 180.0) -> dict[str, dict[str, Any]]:
    """Start whatever is not already running; returns the recorded state.

    Both servers keep their data under PAI_HOME: Prefect's SQLite database, MLflow's SQLite
    database (the same `mlflow.db` that runs without a server write, so earlier runs show
    up in the UI) and MLflow's artifact root."""
    home = pai_home()
    home.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in read_state().items() if _process(v) is not None}
    want = {
        "prefect": (prefect_api_url(host, prefect_port), prefect_port,
                    [_bin("prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
                    {"PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
                     "PREFECT_UI_API_URL": prefect_api_url(host, prefect_port)}),
        "mlflow": (f"http://{host}:{mlflow_port}", mlflow_port,
                   [_bin("mlflow"), "server", "--host", host, "--port", str(mlflow_port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
                    "--artifacts-destination", str(home / "mlartifacts")], {}),
    }
    fresh: list[Started] = []
    for name, (url, port, argv, env) in want.items():
        if name in state:
            continue
        if _port_busy(host, port):
            raise ServerError(f"port {port} on {host} is taken by a process pai did not start; "
                              f"stop it or choose another port (--{name}-port)")
        fresh.append(_spawn(name, argv, env, url))
    try:
        for s in fresh:  # started together, so the two start-ups overlap
            _wait(s, lambda s=s: _answers(_health_url(s.name, s.url)), timeout)
            state[s.name] = s.__dict__
        if worker_pool and "worker" not in state:
            state["worker"] = start_worker(worker_pool, state, timeout).__dict__
    except BaseException:
        _write_state(state)
        for s in fresh:
            if s.name not in state:
                _stop(s.__dict__)
        raise
    _write_state(state)
    return state


def ui_urls(state: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """The browser addresses of the recorded servers (Prefect's UI is its API URL without /api)."""
    state = read_state() if state is None else state
    out = {}
    if "prefect" in state:
        out["Prefect UI"] = state["prefect"]["url"].removesuffix("/api").rstrip("/") + "/"
    if "mlflow" in state:
        from flows.env import mlflow_ui_url

        out["MLflow UI"] = mlflow_ui_url(base=state["mlflow"]["url"])
    return out


def client_env(state: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """The variables a client needs to use the recorded servers (only those that answer)."""
    state = read_state() if state is None else state
    env: dict[str, str] = {}
    if "prefect" in state and _answers(_health_url("prefect", state["prefect"]["url"]), 1.0):
        env["PREFECT_API_URL"] = state["prefect"]["url"]
    if "mlflow" in state and _answers(_health_url("mlflow", state["mlflow"]["url"]), 1.0):
        env["MLFLOW_TRACKING_URI"] = state["mlflow"]["url"]
    return env


def start_worker(pool: str, state: dict[str, dict[str, Any]], timeout: float = 120.0) -> Started:
    """A process worker for `pool` (created if missing) against the recorded servers."""
    env = client_env(state)
    if "PREFECT_API_URL" not in env:
        raise ServerError("no Prefect server answers; run `pai server up` first")
    started = _spawn("worker", [_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process",
                                "--name", f"pai-{socket.gethostname()}-{pool}"], env, env["PREFECT_API_URL"])
    _wait(started, lambda: _worker_online(env["PREFECT_API_URL"], pool), timeout)
    return started


def _worker_online(api: str, pool: str) -> bool:
    req = urllib.request.Request(f"{api}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return any(w.get("status") == "ONLINE" for w in json.loads(r.read()))
    except Exception:
        return False


def _stop(entry: dict[str, Any], grace: float = 15.0) -> bool:
    """Stop the recorded process and everything in its session; True if it was running."""
    proc = _process(entry)
    if proc is None:
        return False
    family = [proc, *proc.children(recursive=True)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(entry["pid"], sig)  # its own session, so its group id is its pid
        except ProcessLookupError:
            pass
        for p in family:  # children that left the group
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=grace if sig == signal.SIGTERM else 5)
        if not alive:
            break
    return True


def down() -> list[str]:
    """Stop the recorded processes (worker first); returns the names that were running."""
    state = read_state()
    stopped = [name for name in ("worker", "mlflow", "prefect") if name in state and _stop(state[name])]
    _state_file().unlink(missing_ok=True)
    return stopped


def status() -> dict[str, dict[str, Any]]:
    out = {}
    for name, entry in read_state().items():
        alive = _process(entry) is not None
        healthy = alive and (name == "worker" or _answers(_health_url(name, entry["url"]), 1.0))
        out[name] = {"pid": entry["pid"], "url": entry["url"], "alive": alive, "healthy": healthy, "log": entry["log"]}
    return out
