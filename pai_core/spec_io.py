"""Loading specs: YAML, dotted overrides, and pydantic's report turned into one line
that names the field and what is allowed (`SpecError`), before any compute starts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pai_core.paradigms import ExperimentSpec, get_paradigm, paradigm_names, validate_spec


class SpecError(ValueError):
    """A spec is invalid; the message is one line naming the field and what is allowed."""


def _one_line(err: ValidationError, root: type[BaseModel] | None = None) -> str:
    """Turn pydantic's report into one line: `field.path: what is wrong (got value)`.

    With no `root`, the errors are an experiment spec's: their first location part is the
    paradigm (the union's tag), which names the model the rest of the path is in."""
    first = err.errors()[0]
    parts = tuple(first["loc"])
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        got = f" {first['input'].get('flow')!r}" if first["type"] == "union_tag_invalid" else " (missing)"
        return f"flow: unknown flow{got}; allowed: {', '.join(paradigm_names())}"
    if root is None:
        root = get_paradigm(str(parts[0])).spec if parts else BaseModel
        parts = parts[1:]
    first = {**first, "loc": parts}
    loc = ".".join(str(p) for p in parts) or "spec"
    if first["type"] == "extra_forbidden":
        allowed = _fields_at(root, first["loc"][:-1])
        msg = f"unknown field; allowed: {', '.join(allowed)}"
    elif first["type"] == "missing":
        msg = "required field is missing"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        head = msg.split(": ", 1)[0]
        if ": " in msg and head.replace(".", "_").isidentifier():  # the message names a deeper field itself
            loc = head if head.startswith(f"{loc}.") or loc == "spec" else f"{loc}.{head}"
            msg = msg.split(": ", 1)[1]
        if first["type"] != "value_error" and not isinstance(first.get("input"), dict):
            msg += f" (got {first.get('input')!r})"
    more = len(err.errors()) - 1
    return f"{loc}: {msg}" + (f" (+{more} more)" if more else "")


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        inner = getattr(field, "annotation", None) if field else None
        candidates = [inner, *getattr(inner, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides; the value is parsed as YAML so `0.9`, `true`, `[1,2]` work."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy, YAML-typed
    for item in overrides:
        path, sep, value = item.partition("=")
        if not sep or not path:
            raise SpecError(f"{item}: override must look like field.path=value")
        node = raw
        parts = path.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise SpecError(f"{path}: {part} is not a section")
            node = node[part]
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def parse_spec(raw: Any) -> ExperimentSpec:
    if not isinstance(raw, dict):
        raise SpecError("spec: must be a mapping of fields")
    try:
        return validate_spec(raw)
    except ValidationError as err:
        raise SpecError(_one_line(err)) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> ExperimentSpec:
    """Read a YAML spec, apply overrides, validate. `name` defaults to the file's stem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if isinstance(raw, dict):
        raw.setdefault("name", path.stem)
    return parse_spec(apply_overrides(raw, overrides or []) if isinstance(raw, dict) else raw)


def flatten(spec: BaseModel, prefix: str = "") -> dict[str, Any]:
    """`{"prune.rate": 0.2, ...}`: the form MLflow params and tables want."""
    out: dict[str, Any] = {}
    for k, v in spec.model_dump(mode="json").items():
        _flat(out, f"{prefix}{k}", v)
    return out


def _flat(out: dict[str, Any], key: str, v: Any) -> None:
    if isinstance(v, dict) and v:
        for k2, v2 in v.items():
            _flat(out, f"{key}.{k2}", v2)
    else:
        out[key] = v
