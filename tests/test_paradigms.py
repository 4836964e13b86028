"""The registries: every paradigm is one registered unit with a flow, a task per role, a
config and a `pai list` line; models carry their metadata and params."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT, loadable_config, tiny_raw
from pai_core.catalog import catalog
from pai_core.criteria import criterion_names
from pai_core.data import dataset_names
from pai_core.models import build_model, model_info, model_names
from pai_core.paradigms import build_plan, get_paradigm, paradigm_names
from pai_core.spec_io import load_spec, parse_spec
from pai_core.stages import get_stage
from pai_core.sweep import is_sweep_file, load_sweep

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def every_config_spec(tmp: Path):
    """Every example config's specs; one that reads an image folder against a tiny generated one in `tmp`."""
    for path in (loadable_config(p, tmp) for p in CONFIGS):
        yield from (load_sweep(path).expand() if is_sweep_file(path) else [load_spec(path)])


def test_every_role_of_every_paradigm_has_a_task_and_a_registered_stage(tmp_path):
    from tasks.stages import task_for

    specs = list(every_config_spec(tmp_path))
    assert {s.flow for s in specs} == set(paradigm_names()), "every paradigm has an example config"
    roles = {(n.stage, n.role) for s in specs for n in build_plan(s).nodes}
    for stage, role in roles:
        get_stage(stage)  # raises for an unregistered stage
        assert task_for(role).name == role
    assert {"eb_search", "lr_rewind", "invert", "pretrain", "retrain"} <= {r for _, r in roles}


def test_flows_are_generated_with_their_paradigms_spec_as_parameter():
    from flows import FLOWS

    assert set(FLOWS) == set(paradigm_names())
    for name, fl in FLOWS.items():
        param = inspect.signature(fl.fn).parameters["spec"]
        assert param.annotation is get_paradigm(name).spec
    import importlib

    module = importlib.import_module("flows.lottery_ticket")  # the entrypoint deployments always used
    assert module.lottery_ticket is FLOWS["lottery_ticket"]
    assert FLOWS["early_bird"].fn.__module__ == "flows.early_bird"


def test_pai_list_names_everything_a_spec_can_name():
    from flows.cli import app

    names = {(kind.split(" ")[0], name) for kind, name, what in catalog() if what}
    for kind, registered in (("paradigm", paradigm_names()), ("criterion", criterion_names()),
                             ("model", model_names()), ("dataset", dataset_names())):
        assert {(kind, n) for n in registered} <= names
    assert {("dynamic", "set"), ("dynamic", "rigl"), ("selection", "edge_popup"), ("schedule", "gradual"),
            ("scope", "erk"), ("structure", "filter")} <= names
    out = CliRunner().invoke(app, ["list"], terminal_width=240)
    assert out.exit_code == 0 and "early_bird" in out.output and "Renda" in out.output


@pytest.mark.parametrize("name", model_names())
def test_model_width_where_it_applies(name):
    info = model_info(name)
    if "width" not in info.Params.model_fields:
        with pytest.raises(Exception, match="width"):
            parse_spec(tiny_raw(model={"name": name, "width": 2}))
        return
    in_shape = (3, 32, 32) if name.startswith(("vgg", "resnet")) else (1, 28, 28)
    base = sum(p.numel() for p in build_model(name, in_shape, 10, seed=0).parameters())
    half = sum(p.numel() for p in build_model(name, in_shape, 10, seed=0, width=0.5).parameters())
    assert half < base
    same = build_model(name, in_shape, 10, seed=0, width=1.0)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(),
                                                 build_model(name, in_shape, 10, seed=0).state_dict().values()))


def test_model_params_change_the_init_key_only_when_not_default():
    key = lambda raw: build_plan(parse_spec(raw)).rounds[0].trained.inputs["start"].key  # noqa: E731
    plain = key(tiny_raw())
    assert key(tiny_raw(model={"name": "lenet_300_100", "width": 1})) == plain
    assert key(tiny_raw(model={"name": "lenet_300_100", "width": 2})) != plain
    wide = build_model("lenet_300_100", (1, 28, 28), 10, seed=0, width=2)
    assert wide.fc1.out_features == 600 and wide.fc2.out_features == 200


def test_model_input_is_checked_on_the_meta_device():
    assert "at least 16x16" in model_info("lenet5").input_problem((1, 8, 8), 10, {})
    assert "at least 8 pixels" in model_info("conv6").input_problem((3, 4, 4), 10, {})
    assert model_info("conv6").input_problem((3, 32, 32), 10, {"width": 0.5}) is None


def test_a_section_of_another_flow_is_refused_by_name():
    from pai_core.spec_io import SpecError

    raw = tiny_raw("prune_at_init")
    raw["prune"] = {"criterion": "snip", "sparsity": 0.9, "rewind_iter": 3}
    with pytest.raises(SpecError, match="prune.rewind_iter: unknown field"):
        parse_spec(raw)


def test_synflow_in_pat_is_one_round_not_a_hundred():
    raw = tiny_raw("prune_after_training")
    raw["prune"] = {"criterion": "synflow", "sparsity": 0.9}
    spec = parse_spec(raw)
    assert spec.prune.rounds == 1 and spec.prune.schedule == "one_shot"
    assert sum(n.role == "finetune" for n in build_plan(spec).nodes) == 1
    at_init = tiny_raw("prune_at_init")
    at_init["prune"] = {"criterion": "synflow", "sparsity": 0.9}
    assert parse_spec(at_init).prune.rounds == 100
