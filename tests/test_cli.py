"""The `pai` commands a user types, through typer's runner."""
from __future__ import annotations

import yaml
from typer.testing import CliRunner

from conftest import tiny_raw, tiny_spec
from flows.cli import app
from pai_core.paradigms import build_plan
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store

runner = CliRunner()


def test_list_names_every_registry():
    out = runner.invoke(app, ["list"], terminal_width=200)
    assert out.exit_code == 0
    for name in ("lenet_300_100", "resnet20", "mnist", "fashion_mnist", "synthetic", "magnitude", "random",
                 "lottery_ticket", "prune_after_training", "prune_at_init", "snip", "grasp", "synflow"):
        assert name in out.output


def test_show_and_results_follow_the_store(tmp_path, pai_home):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_raw()))
    before = runner.invoke(app, ["show", str(path)], terminal_width=200)
    assert before.exit_code == 0 and "stored" not in before.output
    plan = build_plan(tiny_spec())
    assert plan.rounds[1].mask.key in before.output

    # Store the dense round only (as a crashed run would have): show marks exactly those.
    dense_nodes = plan.nodes_by_round()[0]
    run_plan(dense_nodes, Runtime(Store(pai_home / "store"), "cpu"))
    after = runner.invoke(app, ["show", str(path)], terminal_width=200)
    assert after.output.count("stored") == len(dense_nodes)

    res = runner.invoke(app, ["results", str(path)], terminal_width=200)
    assert res.exit_code == 0
    dense_row = next(line for line in res.output.splitlines() if "dense" in line)
    assert "0.0000" in dense_row and "yes" in dense_row
    assert "no" in next(line for line in res.output.splitlines() if "round 2" in line)
