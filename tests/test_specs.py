"""Specs validate everything before compute, with one line naming the field."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, loadable_config, tiny_raw
from flows.cli import app
from pai_core.criteria import criterion_names
from pai_core.spec_io import SpecError, apply_overrides, load_spec, parse_spec

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_config_validates(path, tmp_path):
    from pai_core.sweep import is_sweep_file, load_sweep

    path = loadable_config(path, tmp_path)  # an image folder's config: against a tiny generated folder
    spec = load_sweep(path) if is_sweep_file(path) else load_spec(path)  # a sweep: every grid point
    assert spec.name == path.stem


def test_lth_config_states_its_round_sparsities():
    spec = load_spec(ROOT / "configs/lth/lenet300_mnist.yaml")
    assert [round(1 - d, 6) for d in spec.prune.round_densities()] == [0.2, 0.36, 0.488]


@pytest.mark.parametrize("change, field, allowed", [
    ({"model": {"name": "lenet5", "width": 2}}, "model.width", "allowed: name"),
    ({"model": {"name": "lenet_300_100", "depth": 2}}, "model.depth", "allowed: name, width"),
    ({"model": {"name": "conv2", "width": -1}}, "model.width", "greater than 0"),
    ({"prune": {"schedule": "iterative", "sparsity": 1.5}}, "prune.sparsity", "less than 1"),
    ({"prune": {"schedule": "iterative", "rate": 0.2, "rounds": 2, "gradual": {}}}, "prune.gradual",
     "unknown field; allowed: criterion"),
    ({"flow": "prune_at_the_end"}, "flow: unknown flow 'prune_at_the_end'", "allowed: lottery_ticket"),
    ({"dynamic": {"method": "set"}}, "dynamic", "unknown field; allowed: name, experiment, flow"),
    ({"prune": {"criterion": "nope", "sparsity": 0.5}}, "prune.criterion", "allowed: " + ", ".join(criterion_names())),
    ({"model": {"name": "resnet1000"}}, "model.name", "allowed: "),
    ({"data": {"dataset": "imagenet"}}, "data.dataset", "allowed: "),
    ({"train": {"optimizer": "lbfgs", "lr": 0.1, "epochs": 1}}, "train.optimizer", "'sgd', 'adam' or 'adamw'"),
    ({"bogus": 1}, "bogus", "allowed: name, experiment, flow"),
    ({"prune": {"schedule": "iterative", "rate": 0.2, "rounds": 2, "rewind_iter": 10_000}}, "prune.rewind_iter", "< the"),
    ({"prune": {"schedule": "iterative", "rate": 0.2, "rounds": 2, "sparsity": 0.5}}, "rate 0.2 over 2 rounds", ""),
    ({"train": {"lr": 0.1}}, "set exactly one of epochs or iterations", ""),
])
def test_bad_spec_is_one_line_naming_the_field(change, field, allowed):
    raw = tiny_raw()
    raw.update(change)
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    msg = str(e.value)
    assert "\n" not in msg
    assert field in msg and allowed in msg


def test_overrides_are_typed_and_nested():
    raw = apply_overrides(tiny_raw(), ["prune.rate=0.5", "train.epochs=3", "retrain.lr=0.01", "retrain.epochs=1"])
    spec = parse_spec(raw)
    assert spec.prune.rate == 0.5 and spec.train.epochs == 3 and spec.retrain.lr == 0.01
    with pytest.raises(SpecError, match="field.path=value"):
        apply_overrides(tiny_raw(), ["prune.rate"])


def test_cli_validate_exit_codes_and_writes_nothing(tmp_path, pai_home):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(tiny_raw()))
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(good)])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, ["validate", str(good), "prune.rate=1.5"])
    assert bad.exit_code == 2
    assert "prune.rate" in bad.output and "less than 1" in bad.output
    bad_run = runner.invoke(app, ["run", str(good), "prune.criterion=nope"])
    assert bad_run.exit_code == 2 and "prune.criterion" in bad_run.output
    assert not Path(pai_home).exists(), "a rejected spec must not write anything"


def test_spec_is_frozen():
    spec = parse_spec(tiny_raw())
    with pytest.raises(Exception):
        spec.seed = 3


def test_synflow_defaults_to_100_iterative_rounds():
    raw = tiny_raw("prune_at_init")
    raw["prune"] = {"criterion": "synflow", "sparsity": 0.9}
    p = parse_spec(raw).prune
    assert (p.schedule, p.rounds) == ("iterative", 100)
    assert p.round_densities()[-1] == pytest.approx(0.1) and p.round_densities()[0] == pytest.approx(0.1 ** 0.01)


def test_overrides_between_name_what_a_run_changed():
    from pai_core.spec_io import clean_value, overrides_between

    base = parse_spec(tiny_raw())
    assert overrides_between(base, base) == []
    changed = parse_spec(tiny_raw(seed=3, prune={"rate": 0.5}))
    assert overrides_between(base, changed) == ["seed=3", "prune.rate=0.5"]
    assert overrides_between(base.model_dump(mode="json"), changed) == ["seed=3", "prune.rate=0.5"]
    # A section the base leaves unset: only its non-default fields; and its removal, once.
    retrain = parse_spec(tiny_raw(retrain={"optimizer": "sgd", "lr": 0.01, "epochs": 7}))
    assert overrides_between(base, retrain) == ["retrain.lr=0.01", "retrain.epochs=7"]
    assert overrides_between(retrain, base) == ["retrain=None"]
    assert [clean_value(1 - 0.7 ** 3), clean_value(0.1 + 0.2), clean_value(5e-4), clean_value(True)] == \
        ["0.657", "0.3", "0.0005", "True"]
