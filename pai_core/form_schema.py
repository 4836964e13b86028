"""What the deployment form (Prefect's schema-generated Run form) needs from the specs' JSON
schema: per-field errors in plain words, registry names as dropdowns, and each model's own
parameters as optional fields. Hooked into the spec models by `json_schema_extra`."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pai_core.models import model_info, model_names

HOISTED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength",
            "pattern", "minItems", "maxItems")


def form_schema(schema: dict[str, Any]) -> None:
    """Make a model's JSON schema give the deployment form plain, per-field errors.

    pydantic writes an optional bounded field as `anyOf: [{number, maximum...}, {null}]`, which
    a JSON-schema validator refuses as "1.5 is not valid under any of the given schemas". Bounds
    apply only to values of their type, so they move up beside the `anyOf` (an enum gains
    null): the same values pass, and a bad one gets "1.5 is greater than or equal to the maximum of 1"."""
    for prop in schema.get("properties", {}).values():
        branches = prop.get("anyOf")
        if not branches or len(branches) != 2 or {"type": "null"} not in branches:
            continue
        value = next(b for b in branches if b != {"type": "null"})
        for k in HOISTED:
            if k in value:
                prop[k] = value.pop(k)
        if "enum" in value:
            prop["enum"] = [*value.pop("enum"), None]


def registry_enum(names: Callable[[], list[str]]) -> Callable[[dict[str, Any]], None]:
    """A field's allowed values for the form, read from a registry when the schema is made
    (so a criterion or model registered later is offered too)."""
    def extra(schema: dict[str, Any]) -> None:
        schema["enum"] = list(names())
    return extra


def model_params_schema(schema: dict[str, Any]) -> None:
    """Every registered model's own parameters, as optional fields naming the models that take them
    (the validator refuses one a model does not have)."""
    takes: dict[str, list[str]] = {}
    for name in model_names():
        for field, spec in model_info(name).Params.model_json_schema().get("properties", {}).items():
            if field not in schema["properties"]:  # empty (null) = the model's default
                bounds = {k: v for k, v in spec.items() if k in HOISTED}
                kind = {"type": spec["type"], **({"enum": spec["enum"]} if "enum" in spec else {})}  # a choice stays one
                schema["properties"][field] = {"anyOf": [kind, {"type": "null"}], "default": None,
                                               "title": spec.get("title", field), **bounds,
                                               "description": spec.get("description", field.replace("_", " "))}
            takes.setdefault(field, []).append(name)
    for field, models in takes.items():
        schema["properties"][field]["description"] += f"; only for {', '.join(models)}; empty = the model's default"
