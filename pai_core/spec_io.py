"""Loading specs: YAML, dotted overrides, and pydantic's report turned into one line
that names the field and what is allowed (`SpecError`), before any compute starts.
Reading untrusted YAML (size, nesting, aliases, duplicate keys, encoding): yaml_io.py."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pai_core import yaml_io
from pai_core.paradigms import ExperimentSpec, get_paradigm, paradigm_names, validate_spec
from pai_core.yaml_io import SpecError, clip, dotted

__all__ = ["SpecError", "apply_overrides", "flatten", "load_spec", "parse_spec", "set_field"]

MAX_MESSAGE = 1000  # characters of one error line


def _one_line(err: ValidationError, root: type[BaseModel] | None = None) -> str:
    """Turn pydantic's report into one line: `field.path: what is wrong (got value)`.

    With no `root`, the errors are an experiment spec's: their first location part is the
    paradigm (the union's tag), which names the model the rest of the path is in."""
    first = err.errors(include_url=False)[0]
    parts = tuple(first["loc"])
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        got = f" {clip(first['input'].get('flow'))}" if first["type"] == "union_tag_invalid" else " (missing)"
        return f"flow: unknown flow{got}; allowed: {', '.join(paradigm_names())}"
    if root is None:
        root = get_paradigm(str(parts[0])).spec if parts else BaseModel
        parts = parts[1:]
    first = {**first, "loc": parts}
    loc = dotted(parts) or "spec"
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
            msg += f" (got {clip(first.get('input'))})"
    more = err.error_count() - 1
    return one_line(f"{loc}: {msg}" + (f" (+{more} more)" if more else ""))


def one_line(msg: str) -> str:
    """The last guard of "one line": no line breaks, and a bounded length."""
    msg = msg.replace("\r", " ").replace("\n", " ")
    return msg if len(msg) <= MAX_MESSAGE else msg[:MAX_MESSAGE - 1] + "…"


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
    raw = yaml_io.plain(raw)  # a deep copy that shares nothing (aliases included)
    for item in overrides:
        path, sep, value = item.partition("=")
        if not sep or not path.strip():
            raise SpecError(f"{dotted([item])}: override must look like field.path=value")
        set_field(raw, path.strip(), yaml_io.parse_value(value, dotted([path.strip()])))
    return raw


def set_field(raw: dict[str, Any], path: str, value: Any) -> None:
    """Set the dotted field `path` of `raw` (sections made as needed) to `value`, in place."""
    parts = path.split(".")
    if len(path) > 200 or len(parts) > yaml_io.MAX_DEPTH:
        raise SpecError(f"{dotted([path])}: a field path is at most {yaml_io.MAX_DEPTH} names and 200 characters")
    if not all(p.strip() for p in parts):
        raise SpecError(f"{path}: empty field name in the path")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise SpecError(f"{path}: {part} is not a section")
        node = node[part]
    node[parts[-1]] = value


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
    raw = yaml_io.read(path, "spec")
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


def clean_value(v: Any) -> str:
    """A value as people write it: floats to 10 significant digits, so arithmetic noise
    (0.3429999999999999 from 1 - 0.8**3 ...) reads 0.343."""
    if isinstance(v, float):
        return repr(float(f"{v:.10g}"))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(clean_value(x) for x in v) + "]"
    return str(v)


def overrides_between(base: BaseModel | dict[str, Any], spec: BaseModel) -> list[str]:
    """The dotted overrides that turn `base` into `spec` (`["prune.rate=0.5"]`), in field order:
    what names a run that changed its deployment's or its file's parameters. A section `base`
    leaves unset (`retrain: None`) shows only the fields that differ from their defaults."""
    before = flatten(base) if isinstance(base, BaseModel) else _flat_dict(base)
    after = flatten(spec)
    out = []
    for k, v in after.items():
        if k in before:
            if before[k] != v:
                out.append(f"{k}={clean_value(v)}")
        elif any(b.startswith(k + ".") for b in before):  # a section `spec` leaves unset
            out.append(f"{k}={clean_value(v)}")
        elif not _is_default(spec, k, v):
            out.append(f"{k}={clean_value(v)}")
    gone = [k for k in before if k not in after and not any(a.startswith(k + ".") for a in after)]
    return out + [f"{k}=None" for k in gone if not any(k.startswith(a + ".") for a in after)]


def _is_default(spec: BaseModel, dotted_key: str, value: Any) -> bool:
    """Whether the field at `dotted_key` holds its class default (a required field never does)."""
    *path, name = dotted_key.split(".")
    obj: Any = spec
    for part in path:
        obj = getattr(obj, part, None)
    field = type(obj).model_fields.get(name) if isinstance(obj, BaseModel) else None
    if field is None or field.is_required():
        return False
    default = field.get_default(call_default_factory=True)
    return (default.model_dump(mode="json") if isinstance(default, BaseModel) else
            list(default) if isinstance(default, tuple) else default) == value


def _flat_dict(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        _flat(out, k, v)
    return out
