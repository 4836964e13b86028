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
    assert "FLOPs %" in res.output and "100.00" in dense_row  # the dense net's own FLOPs
    assert "no" in next(line for line in res.output.splitlines() if "round 2" in line)


def test_show_lists_the_filter_families_and_their_densities(tmp_path, pai_home):
    raw = tiny_raw("prune_after_training", model={"name": "resnet20", "width": 0.25},
                   data={"dataset": "synthetic_cifar", "batch_size": 50},
                   prune={"schedule": "one_shot", "sparsity": 0.5, "rate": None, "rounds": 1, "scope": "layerwise",
                          "structure": "filter", "layer_density": {"layer3.*": 0.25}})
    path = tmp_path / "filters.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = runner.invoke(app, ["show", str(path)], terminal_width=250)
    assert out.exit_code == 0, out.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]]
            for line in out.output.splitlines() if line.startswith("│ ") and line.split("│")[1].strip()}
    assert rows["conv1"][0] == "4" and "… (4)" in out.output  # the stage-1 stream: the stem and 3 blocks' conv2
    assert rows["layer1.0.conv1"] == ["4", "layer1.0.conv1", "0.5000"]
    assert rows["layer3.1.conv1"] == ["16", "layer3.1.conv1", "0.2500"]


def fake_report_flow(monkeypatch, tmp_path) -> list:
    """`pai report` up to the flow: record what it would report (no Prefect, no MLflow)."""
    import flows.report

    calls = []
    md = tmp_path / "report.md"
    md.write_text("| method |\n| dense |\n\n![plot](accuracy.png)\n")

    def report_flow(specs, name):
        calls.append((specs, name))
        return {"markdown": str(md), "dir": str(tmp_path), "mlflow_run_id": "abc"}

    monkeypatch.setattr(flows.report, "report", report_flow)
    return calls


def test_report_applies_overrides_to_every_spec(tmp_path, monkeypatch):
    calls = fake_report_flow(monkeypatch, tmp_path)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(tiny_raw(name="a")))
    b.write_text(yaml.safe_dump(tiny_raw(name="b", seed=1)))
    out = runner.invoke(app, ["report", str(a), "prune.rate=0.5", str(b), "train.epochs=1"], terminal_width=200)
    assert out.exit_code == 0, out.output
    [(specs, name)] = calls
    assert [(s.name, s.seed, s.prune.rate, s.train.epochs) for s in specs] == [("a", 0, 0.5, 1), ("b", 1, 0.5, 1)]
    assert name == "a" and "| dense |" in out.output and "accuracy.{png,pdf,svg}" in out.output

    bad = runner.invoke(app, ["report", str(a), "prune.rate=2"], terminal_width=200)
    assert bad.exit_code == 2 and "invalid spec" in bad.output and "rate" in bad.output
    alone = runner.invoke(app, ["report", "prune.rate=0.5"], terminal_width=200)
    assert alone.exit_code == 2 and "give a sweep YAML or experiment spec YAMLs" in alone.output
    assert len(calls) == 1


def test_report_refuses_overrides_for_a_sweep(tmp_path, monkeypatch):
    calls = fake_report_flow(monkeypatch, tmp_path)
    path = tmp_path / "sw.yaml"
    path.write_text(yaml.safe_dump({"name": "sw", "base": [tiny_raw()], "grid": {"seed": [0, 1]}}))
    out = runner.invoke(app, ["report", str(path), "prune.rate=0.5"], terminal_width=200)
    assert out.exit_code == 2 and not calls
    assert "invalid sweep" in out.output and "overrides (prune.rate=0.5) apply to a spec" in out.output
    ok = runner.invoke(app, ["report", str(path)], terminal_width=200)
    assert ok.exit_code == 0 and [(len(specs), name) for specs, name in calls] == [(2, "sw")]


def test_report_flow_run(tmp_path, monkeypatch):
    import uuid
    from types import SimpleNamespace

    import flows.report
    from prefect.exceptions import ObjectNotFound

    calls = fake_report_flow(monkeypatch, tmp_path)
    spec, known = tiny_spec(name="from-ui", prune={"rate": 0.5}), uuid.uuid4()
    runs = {known: SimpleNamespace(name="gentle-fox", parameters={"spec": spec.model_dump(mode="json")}),
            uuid.UUID(int=1): SimpleNamespace(name="calm-owl", parameters={"specs": []})}

    def read(flow_run_id):
        if flow_run_id not in runs:
            raise ObjectNotFound(None)
        return runs[flow_run_id]

    monkeypatch.setattr(flows.report, "read_flow_run", read)
    out = runner.invoke(app, ["report", "--flow-run", str(known)], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert calls == [([spec], "from-ui")]

    unknown = runner.invoke(app, ["report", "--flow-run", str(uuid.uuid4())], terminal_width=200)
    assert unknown.exit_code == 1 and "no flow run" in unknown.output
    neither = runner.invoke(app, ["report", "--flow-run", str(uuid.UUID(int=1))], terminal_width=200)
    assert neither.exit_code == 2 and "'calm-owl' has neither a `spec` nor a `sweep` parameter" in neither.output
    malformed = runner.invoke(app, ["report", "--flow-run", "gentle-fox"], terminal_width=200)
    assert malformed.exit_code == 2 and "not a flow run id" in malformed.output
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(tiny_raw()))
    both = runner.invoke(app, ["report", str(path), "--flow-run", str(known)], terminal_width=200)
    assert both.exit_code == 2 and "--flow-run takes no spec files or overrides" in both.output
    assert len(calls) == 1
