"""Dynamic sparse training methods: one file each, registered by name.

A method is what `dynamic.method` names in a `dynamic_sparse` spec. It brings its own
pydantic `Params` (the paper's defaults; `dynamic.params` is validated against it before
anything runs) and a factory that builds the training callback from the train node's
`dynamic` fields, the run's total iterations and a seed drawn from the node's key.

SET and RigL predate the registry: their options are the `dynamic.*` fields themselves
(`top_level=True`) and their stage keys stay exactly what they were. Every later method
takes its options in `dynamic.params` only, and its train key holds them resolved
(`{"method": ..., "params": {every field, defaults filled in}}`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from pai_core.training import Callback

Build = Callable[[dict[str, Any], int, int], Callback]  # (node's `dynamic` fields, total iterations, seed)


class MethodParams(BaseModel):
    """A method's own options: frozen, unknown fields and NaN/inf refused. Fields added after the
    method's keys were first stored are listed in `KEYED_WHEN_SET`: they enter the train key only
    when they differ from their default, so a new option never invalidates stored runs."""
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    KEYED_WHEN_SET: ClassVar[frozenset[str]] = frozenset()

    def key_fields(self) -> dict[str, Any]:
        """Every option, defaults filled in, as the train key holds them (see `KEYED_WHEN_SET`)."""
        dumped = self.model_dump(mode="json")
        for name in self.KEYED_WHEN_SET:
            if getattr(self, name) == type(self).model_fields[name].get_default(call_default_factory=True):
                dumped.pop(name)
        return dumped

    def display_label(self, label: str) -> str:
        """How results name a run of the method with these params (an ablation may have its own name)."""
        return label

    def schedule_problem(self, total: int, iterations_per_epoch: int) -> str | None:
        """`"params.<field>: why; allowed: ..."` when no mask update would ever happen in
        `total` iterations (the spec would claim a dynamic method and train a static mask)."""
        return None


@dataclass(frozen=True)
class DynamicMethod:
    name: str
    label: str  # how results tables and reports name it
    description: str
    Params: type[MethodParams]
    build: Build
    top_level: bool = False  # SET/RigL: options are the dynamic.* fields, not dynamic.params
    keeps_nm: bool = False  # its masks keep prune.structure nm (its fields hold "nm": [n, m] or [n, m, "channels"])


_METHODS: dict[str, DynamicMethod] = {}


def register(name: str, *, label: str, description: str, params: type[MethodParams] = MethodParams,
             top_level: bool = False, keeps_nm: bool = False) -> Callable[[Build], Build]:
    def deco(fn: Build) -> Build:
        if name in _METHODS:
            raise ValueError(f"dynamic method {name!r} registered twice")
        _METHODS[name] = DynamicMethod(name, label, description, params, fn, top_level, keeps_nm)
        return fn
    return deco


def dynamic_method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> DynamicMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown dynamic method {name!r}; allowed: {', '.join(dynamic_method_names())}") from None
