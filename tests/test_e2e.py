"""End to end through the `pai` command, as a user runs it (separate processes, Prefect's
temporary server): real MNIST, re-runs that compute nothing, and a kill -9 mid-round."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_raw
from pai_core.paradigms import build_plan
from pai_core.spec_io import load_spec
from pai_core.store import Store

pytestmark = pytest.mark.slow
PAI = [sys.executable, "-m", "flows.cli"]
SHORT = ["train.epochs=1", "prune.rounds=1", "prune.reinit_control=false"]


def pai(*args, env, check=True, **kw):
    out = subprocess.run([*PAI, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600, **kw)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.fixture
def env(pai_home):
    return {**os.environ, "COLUMNS": "200", "PAI_HOME": str(pai_home)}


def test_lth_on_real_mnist_then_rerun_and_pat_reuse(env, pai_home):
    lth = ROOT / "configs/lth/lenet300_mnist.yaml"
    out = pai("run", lth, *SHORT, env=env)
    assert "0 reused" in out
    spec = load_spec(lth, SHORT)
    store = Store(pai_home / "store")
    plan = build_plan(spec)
    dense = store.get("evaluate", plan.rounds[0].evaluate.key).info
    assert dense.test_acc > 0.95, dense  # one epoch; the full config is measured in the README
    mask = store.get("mask", plan.rounds[1].mask.key).info
    assert mask.layers["total"]["kept"] == round(266_200 * 0.8)

    again = pai("run", lth, *SHORT, env=env)
    assert "0 stages computed" in again

    pat = ROOT / "configs/pat/lenet300_mnist.yaml"
    show = pai("show", pat, "train.epochs=1", env=env)
    pretrain_row = next(line for line in show.splitlines() if " pretrain " in line)
    assert "stored" in pretrain_row


def test_kill_9_mid_round_resumes_at_the_checkpoint(env, pai_home, tmp_path):
    raw = tiny_raw(model={"name": "conv4"}, data={"batch_size": 10}, train={"epochs": 6},
                   prune={"rounds": 3}, name="killme")
    path = tmp_path / "killme.yaml"
    path.write_text(yaml.safe_dump(raw))
    plan = build_plan(load_spec(path))
    store = Store(pai_home / "store")
    round2 = plan.rounds[2].trained
    ckpt = store.checkpoint_path("train", round2.key)

    proc = subprocess.Popen([*PAI, "run", str(path)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    # Wait on progress, not on a clock: a loaded machine is slow, a stuck run makes no progress.
    seen, stalled_since = None, time.time()
    while not ckpt.exists():
        assert proc.poll() is None, "the run ended before round 2 wrote a checkpoint"
        files = list(store.root.rglob("*")) if store.root.exists() else []
        now = (len(files), max((f.stat().st_mtime_ns for f in files if f.exists()), default=0))
        if now != seen:
            seen, stalled_since = now, time.time()
        assert time.time() - stalled_since < 600, "no new artifact or checkpoint for 10 minutes"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.get("train", round2.key) is None and ckpt.exists()
    done_before = {n.key for n in plan.nodes if store.get(n.stage, n.key) is not None}
    assert {n.key for n in plan.nodes_by_round()[1]} <= done_before

    out = pai("run", path, env=env)
    assert "resuming from checkpoint at iteration" in out
    for line in out.splitlines():
        if " computed" in line and "stages computed" not in line:
            key = line.split()[-2]
            assert key not in done_before, f"finished stage recomputed: {line}"
    assert store.get("train", round2.key) is not None and not ckpt.exists()
