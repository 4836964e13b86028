"""benchmarks/gpu_throughput.py is meant for a GPU machine where there is one try: its smoke
mode runs every code path (plain loop, stage, masked stage, bf16, channels_last, packing in
subprocesses) at tiny sizes on CPU, so the script is known to run before it gets there."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_throughput_smoke_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "gt.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {r["setting"] for r in result["rows"]} == {"fp32", "bf16+cl", "bf16+cl, nondeterministic"}
    assert all(r["plain"] > 0 and r["stage"] > 0 and r["masked"] > 0 for r in result["rows"])
    assert [p["trainings"] for p in result["packing"]] == [1, 2] and all(p["aggregate"] > 0 for p in result["packing"])
    assert "stage/plain" in proc.stdout and "packing ResNet-20" in proc.stdout


def test_gpu_check_variants_are_valid_specs_with_plans():
    """benchmarks/gpu_check.py runs each paradigm and method on a GPU, where a spec error would
    cost the one try: every variant must parse and plan here (its --list mode runs nothing)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--list"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = [line.rsplit(" ", 2)[0] for line in proc.stdout.splitlines()]
    assert {"supermask iterand", "dynamic mest em_s", "dynamic granet", "dynamic topkast", "prune_at_init prospr",
            "early_bird resnet20 channels"} <= set(listed) and len(listed) >= 20
