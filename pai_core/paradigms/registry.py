"""The paradigm registry: one file per paradigm registers its spec, its plan and its labels.

A paradigm's spec class extends `ExperimentBase` with `flow: Literal["<name>"]` and its own
sections; the experiment spec is the union of every registered one, discriminated by `flow`,
so a section given to the wrong flow is refused by name. Prefect flows, deployments and
`pai list` are generated from this table (flows/paradigm_flows.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pai_core.plan import Plan, Round
from pai_core.specs import ExperimentBase


@dataclass(frozen=True)
class Paradigm:
    name: str
    spec: type[ExperimentBase]
    plan: Callable[[Any], Plan]
    label: Callable[[Any, Round], str]  # the report's method label of a pruned round
    description: str                     # one line, for `pai list`
    doc: str = ""                        # the paradigm module's docstring: the flow's description


_PARADIGMS: dict[str, Paradigm] = {}


def register_paradigm(name: str, spec: type[ExperimentBase], plan: Callable[[Any], Plan],
                      label: Callable[[Any, Round], str], description: str, doc: str = "") -> Paradigm:
    if name in _PARADIGMS:
        raise ValueError(f"paradigm {name!r} registered twice")
    flow = spec.model_fields["flow"]
    if getattr(flow.annotation, "__args__", None) != (name,):
        raise ValueError(f"{spec.__name__}.flow must be Literal[{name!r}]")
    _PARADIGMS[name] = Paradigm(name, spec, plan, label, description, (doc or "").strip())
    return _PARADIGMS[name]


def paradigm_names() -> list[str]:
    return list(_PARADIGMS)


def get_paradigm(name: str) -> Paradigm:
    if name not in _PARADIGMS:
        raise ValueError(f"unknown flow {name!r}; allowed: {', '.join(_PARADIGMS)}")
    return _PARADIGMS[name]


def build_plan(spec: ExperimentBase) -> Plan:
    return get_paradigm(spec.flow).plan(spec)
