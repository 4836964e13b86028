"""pai_core.speedup and `pai speedup`: what is timed computes what the masked model computes,
refusals become rows that say why, and the table reaches the round's MLflow run. (No timing
claims here: those live in benchmarks/speedup.py.)"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import tracked_tiny_run
from flows.cli import app
from pai_core.speedup import markdown, measure, time_call


def test_time_call_runs_enough_calls_per_run_and_reports_the_median():
    calls = []
    t = time_call(lambda: calls.append(1), warmup=2, repeats=3, min_run_s=0.001)
    assert t.calls >= 1 and t.median_s > 0
    # warm-up, calibration (1, 2, 4, ... calls until a run lasts min_run_s), then 3 runs of t.calls
    assert len(calls) >= 2 + 3 * t.calls


def test_measure_checks_and_times_every_format_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    params = dict(model.named_parameters())
    mask = {n: torch.rand(params[n].shape) < 0.3 for n in ("1.weight", "3.weight")}
    rows = measure("tiny", model, mask, (16,), formats=("dense", "csr", "bsr", "structured"), batches=(1, 4),
                   block_size=3, repeats=1, min_run_s=0.0005)
    by = {(r.format, r.batch): r for r in rows}
    assert set(by) == {(f, b) for f in ("dense", "csr", "bsr", "structured") for b in (1, 4)}
    for fmt in ("dense", "csr"):
        for b in (1, 4):
            r = by[(fmt, b)]
            assert r.max_abs_diff <= 1e-4 and r.speedup == pytest.approx(r.dense_seconds / r.seconds)
            assert r.threads == torch.get_num_threads() and not r.note
    # 3 divides neither 32 nor 8, and a random mask is not whole filters: rows that say so
    assert by[("bsr", 1)].note.startswith("refused: bsr block size 3")
    assert by[("structured", 4)].note.startswith("refused:") and math.isnan(by[("structured", 4)].speedup)
    table = markdown(rows)
    assert "| tiny | csr | 4 |" in table and "refused: bsr block size 3" in table


def test_pai_speedup_times_a_stored_round_and_logs_the_table_to_its_mlflow_run(pai_home, tmp_path):
    path, client = tracked_tiny_run(pai_home, tmp_path)
    res = CliRunner().invoke(app, ["speedup", str(path), "--batch", "1", "--batch", "8", "--repeats", "1"],
                             env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "| tiny, round 1 | csr | 8 |" in res.output and "logged to MLflow run" in res.output
    rid = res.output.rsplit("logged to MLflow run ", 1)[1].split()[0]
    assert client.get_run(rid).info.run_name == "round 1"
    assert {"speedup.md", "speedup.json"} <= {a.path for a in client.list_artifacts(rid)}
    missing = CliRunner().invoke(app, ["speedup", str(path), "prune.rate=0.5"])
    assert missing.exit_code == 2 and "not stored yet" in missing.output


def test_measure_times_the_given_baseline_as_dense_and_refuses_cuda_graphs_off_cuda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8)).eval()
    mask = {"1.weight": torch.rand(8, 16) < 0.5}

    class Counted(nn.Module):  # the dense side: counts its calls
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net, self.calls = net, 0

        def forward(self, x):
            self.calls += 1
            return self.net(x)

    baseline = Counted(nn.Sequential(nn.Flatten(), nn.Linear(16, 8)))
    rows = measure("tiny", model, mask, (16,), formats=("csr",), batches=(2,), repeats=1, min_run_s=0.0005,
                   baseline=baseline, note="vs a counted baseline")
    assert baseline.calls > 0 and rows[0].note == "vs a counted baseline" and rows[0].max_abs_diff <= 1e-4
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device, not cpu"):
        measure("tiny", model, mask, (16,), formats=("csr",), batches=(2,), cuda_graph=True)
    res = CliRunner().invoke(app, ["speedup", "no-such-spec.yaml", "--cuda-graph"])
    assert res.exit_code == 2 and "--cuda-graph needs --device cuda (got cpu)" in res.output


def test_a_format_that_cannot_be_captured_in_a_cuda_graph_gets_a_row_saying_why(monkeypatch):
    from pai_core import speedup

    def refuse(module, x):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
    monkeypatch.setattr(speedup, "graph_replay", refuse)
    net = nn.Linear(4, 2)
    why = speedup._runners(net, net, torch.randn(3, 4), cuda_graph=True)
    assert why == "refused: not capturable in a CUDA graph: operation not permitted when stream is capturing"
    dense, run = speedup._runners(net, net, torch.ones(3, 4), cuda_graph=False)  # eager: plain calls
    assert torch.equal(dense(), net(torch.ones(3, 4))) and torch.equal(run(), dense())
