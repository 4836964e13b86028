"""The deployment form: each flow's parameter schema, as the Prefect server and UI use it.

The server checks a custom run against this schema (`enforce_parameter_schema`) with Prefect's
own validator, and the UI places each error at the field it names; so these tests run that
validator on the schema Prefect derives from the flow, exactly as the server would."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import build_error_obj, validate

from conftest import ROOT, tiny_raw
from flows import FLOWS
from pai_core.criteria import criterion_names
from pai_core.data import dataset_names
from pai_core.models import model_names
from pai_core.paradigms import paradigm_names
from pai_core.spec_io import load_spec, parse_spec
from pai_core.sweep import is_sweep_file

CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not is_sweep_file(p))
# (prune.structure, n, m are every pruning paradigm's: N:M sparsity; PaT's, LTH's and PaI's structure
# adds filter, with filter_norm and physical)
OTHER_SECTIONS = {"gradual", "filter_norm", "physical", "selection", "sanity", "dynamic", "early_bird", "rewind_iter",
                  "lr_rewind_iter", "reinit_control"}


def schema_of(flow: str) -> dict:
    return parameter_schema(FLOWS[flow]).model_dump()


def errors_at(flow: str, spec: dict) -> dict:
    """Prefect's server-side check of a custom run: the error tree the UI shows field by field."""
    errs = validate({"spec": spec}, schema_of(flow), raise_on_error=False, preprocess=True, ignore_required=True)
    return build_error_obj(errs)


def field_errors(tree: dict, path: tuple[str, ...]) -> list[str]:
    level = tree["errors"]
    for part in ("spec", *path):
        entry = next((e for e in level if isinstance(e, dict) and e.get("property") == part), None)
        assert entry is not None, f"no error at {part} of {path}: {json.dumps(tree)}"
        level = entry["errors"]
    return [e for e in level if isinstance(e, str)]


def properties(schema: dict) -> dict[str, dict[str, dict]]:
    return {name: d.get("properties", {}) for name, d in schema["definitions"].items()}


@pytest.mark.parametrize("flow", paradigm_names())
def test_each_flow_form_is_its_own_paradigm_with_every_field_described(flow):
    schema = schema_of(flow)
    root = schema["definitions"][schema["properties"]["spec"]["$ref"].rsplit("/", 1)[-1]]
    assert root["properties"]["flow"]["const"] == flow
    undescribed = [f"{d}.{k}" for d, props in properties(schema).items() for k, v in props.items()
                   if not v.get("description")]
    assert not undescribed, f"fields without a description in the {flow} form: {undescribed}"
    own = {k for props in properties(schema).values() for k in props}
    spec_fields = {k for k in parse_spec(tiny_raw(flow)).model_dump()} if flow in (
        "lottery_ticket", "prune_after_training") else set()
    assert spec_fields <= own
    if flow == "lottery_ticket":  # LTH's form has LTH's prune fields and no other paradigm's sections
        assert own & OTHER_SECTIONS == {"rewind_iter", "reinit_control", "filter_norm", "physical"}
        assert {"structure", "n", "m"} <= own


@pytest.mark.parametrize("flow", paradigm_names())
def test_registry_values_are_enums_in_every_form(flow):
    props = properties(schema_of(flow))
    assert props["ModelSpec"]["name"]["enum"] == model_names()
    assert props["DataSpec"]["dataset"]["enum"] == dataset_names()
    criteria = [p["criterion"]["enum"] for p in props.values() if "criterion" in p]
    assert all(c == criterion_names() for c in criteria)
    free_text = [f"{d}.{k}" for d, p in props.items() for k, v in p.items()
                 if v.get("type") == "string" and "enum" not in v and "const" not in v]
    assert set(free_text) <= {f"{d}.{k}" for d in props for k in ("name", "experiment")}, free_text


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_config_passes_the_servers_check(path: Path):
    spec = load_spec(path)
    tree = errors_at(spec.flow, spec.model_dump(mode="json"))
    assert tree["valid"], json.dumps(tree)


@pytest.mark.parametrize("section, field, value, says", [
    ("prune", "criterion", "snipp", "'snipp' is not one of"),
    ("prune", "rate", 1.5, "1.5 is greater than or equal to the maximum of 1"),
    ("prune", "bn_mode", "sometimes", "'sometimes' is not one of ['train', 'eval', None]"),
    ("model", "name", "lenet301", "'lenet301' is not one of"),
    ("data", "dataset", "cifar11", "'cifar11' is not one of"),
    ("train", "lr", 0, "0 is less than or equal to the minimum of 0"),
    ("train", "epochs", 0, "0 is less than or equal to the minimum of 0"),
])
def test_a_bad_value_is_refused_at_its_field_in_one_plain_sentence(section, field, value, says):
    spec = copy.deepcopy(parse_spec(tiny_raw()).model_dump(mode="json"))
    spec[section][field] = value
    (message,) = field_errors(errors_at("lottery_ticket", spec), (section, field))
    assert message.startswith(says) and "any of the given schemas" not in message


def test_optional_fields_still_accept_empty_and_in_range_values():
    spec = parse_spec(tiny_raw(prune={"rate": None, "sparsity": 0.36, "bn_mode": None})).model_dump(mode="json")
    assert errors_at("lottery_ticket", spec)["valid"]
    spec["prune"]["rate"] = 0.2
    assert errors_at("lottery_ticket", spec)["valid"]


def test_model_params_are_in_the_form_and_an_empty_one_means_the_default():
    props = properties(schema_of("lottery_ticket"))["ModelSpec"]
    assert "conv2" in props["batch_norm"]["description"] and "lenet_300_100" not in props["batch_norm"]["description"]
    assert props["width"]["exclusiveMinimum"] == 0
    # What a form sends for fields left empty: the model's defaults, the same stage keys.
    empty = parse_spec(tiny_raw(model={"name": "lenet_300_100", "width": None, "batch_norm": None}))
    assert empty == parse_spec(tiny_raw())
    with pytest.raises(ValueError, match="batch_norm: unknown field for lenet_300_100"):
        parse_spec(tiny_raw(model={"name": "lenet_300_100", "batch_norm": True}))
