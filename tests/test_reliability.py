"""Kills at several points, and the local state they used to leave broken (issue 12, findings
1–3): the MLflow database, RUNNING leftovers in MLflow and Prefect, the orphaned temporary
Prefect server. Each test failed on the code before the fix."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import ROOT, tiny_raw
from pai_core.executor import run_specs
from pai_core.paradigms import build_plan
from pai_core.spec_io import load_spec
from pai_core.store import Store

PAI = [sys.executable, "-m", "flows.cli"]


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "PAI_HOME": str(home)}


def _wait(cond, what: str, proc: subprocess.Popen | None = None, stall: float = 600, log: Path | None = None) -> None:
    start = time.time()
    while not cond():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}:\n{tail}")
        assert time.time() - start < stall, f"no {what} after {stall} s"
        time.sleep(0.05)


def _mlflow_db_state(home: Path):
    from flows.local_state import _state

    return _state(home / "mlflow.db")


# ------------------------------------------------------------------ the MLflow database

CREATE = "from flows.env import mlflow_client; c = mlflow_client(); c.create_experiment('x' + __import__('os').environ['K'])"


def test_a_kill_while_mlflow_creates_its_database_leaves_it_usable(tmp_path):
    home = tmp_path / "home"
    proc = subprocess.Popen([sys.executable, "-c", CREATE], cwd=ROOT, env={**_env(home), "K": "1"})
    time.sleep(1.5)  # creating the schema takes ~3 s here
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run([sys.executable, "-c", CREATE], cwd=ROOT, env={**_env(home), "K": "2"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _mlflow_db_state(home)[0] == "ok"


def test_two_first_runs_at_once_share_one_complete_database(tmp_path):
    home = tmp_path / "home"
    procs = [subprocess.Popen([sys.executable, "-c", CREATE], cwd=ROOT, env={**_env(home), "K": str(i)},
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert _mlflow_db_state(home)[0] == "ok"


def test_a_half_made_database_without_runs_is_set_aside_and_remade(tmp_path, caplog):
    from flows.local_state import ensure_mlflow_db

    db = tmp_path / "mlflow.db"
    con = sqlite3.connect(db)  # what an interrupted creation by an older pai-flow left
    con.execute("create table alembic_version (version_num varchar(32))")
    con.execute("insert into alembic_version values ('451aebb31d03')")
    con.execute("create table experiments (experiment_id integer)")
    con.commit()
    con.close()
    ensure_mlflow_db(db, tmp_path / "art")
    assert _mlflow_db_state(tmp_path)[0] == "ok"
    assert list(tmp_path.glob("mlflow.db.incomplete-*")) and "moved to" in caplog.text


def test_garbage_database_is_set_aside_and_one_with_runs_is_never_touched(tmp_path):
    from flows.local_state import TrackingStoreError, ensure_mlflow_db

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"\x00garbage" * 100)
    ensure_mlflow_db(db, tmp_path / "art")
    assert list(tmp_path.glob("mlflow.db.unreadable-*"))
    con = sqlite3.connect(db)  # a real database with a run, from another MLflow version
    con.execute("insert into experiments (name, lifecycle_stage) values ('e', 'active')")
    con.execute("insert into runs (run_uuid, experiment_id, lifecycle_stage) values ('r', 1, 'active')")
    con.execute("update alembic_version set version_num = 'older'")
    con.commit()
    con.close()
    with pytest.raises(TrackingStoreError, match="1 runs .*mlflow db upgrade") as e:
        ensure_mlflow_db(db, tmp_path / "art")
    assert "\n" not in str(e.value) and db.exists()


# ------------------------------------------------------- a killed `pai run`, then a re-run

@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["mid-training", "after the last stage"])
def test_sigkill_of_pai_run_leaves_nothing_running_and_loses_nothing(tmp_path, kill_at):
    home = tmp_path / "home"
    raw = tiny_raw(model={"name": "conv4"}, data={"batch_size": 5}, train={"epochs": 6}, prune={"rounds": 2},
                   name="killme")
    path = tmp_path / "killme.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path)
    plan = build_plan(spec)
    store = Store(home / "store")
    if kill_at == "mid-training":
        ckpt = store.checkpoint_path("train", plan.rounds[1].trained.key)
        ready = ckpt.exists
    else:
        last = plan.rounds[-1].evaluate
        ready = lambda: store.meta_path("evaluate", last.key).exists()  # noqa: E731
    log = tmp_path / "first.log"
    with open(log, "w") as out_file:
        proc = subprocess.Popen([*PAI, "run", str(path)], cwd=ROOT, env=_env(home), stdout=out_file,
                                stderr=subprocess.STDOUT)
    _wait(ready, kill_at, proc, log=log)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "Prefect's temporary server runs beside `pai run`"
    proc.send_signal(signal.SIGKILL)  # the `pai run` process alone, as a user's kill -9 would
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"orphaned: {[p.cmdline()[:4] for p in alive]}"

    out = subprocess.run([*PAI, "run", str(path)], cwd=ROOT, env=_env(home), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # Nothing RUNNING is left: the killed attempt is KILLED in MLflow and Crashed in Prefect.
    with sqlite3.connect(home / "mlflow.db") as con:
        statuses = [r[0] for r in con.execute(
            "select status from runs join tags on runs.run_uuid = tags.run_uuid "
            "where tags.key = 'pai.spec' and tags.value = 'killme' and runs.run_uuid not in "
            "(select run_uuid from tags where key = 'pai.round')")]  # the parent runs, not their rounds
        assert "RUNNING" not in {r[0] for r in con.execute("select status from runs")}
    assert sorted(statuses) == ["FINISHED", "KILLED"]
    with sqlite3.connect(f"file:{home / 'prefect.db'}?mode=ro", uri=True) as con:
        states = [r[0] for r in con.execute("select state_type from flow_run")]
    assert "RUNNING" not in states and "CRASHED" in states and "COMPLETED" in states
    assert not list(home.rglob("*.tmp")), "no temp file left behind"
    # Every artifact is the one an uninterrupted run makes, bit for bit.
    clean = Store(tmp_path / "clean" / "store")
    ref = run_specs([spec], clean)
    for n in plan.nodes:
        assert store.get(n.stage, n.key).sha256 == ref.refs[n.key].sha256, f"{n.role} differs"
