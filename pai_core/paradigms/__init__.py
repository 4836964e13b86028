"""Paradigms: one file each, registered on import. Adding one: a file here and an import
line below (its flow, deployment and `pai list` entry follow from the registration).

`ExperimentSpec` is the union of every registered paradigm's spec, discriminated by `flow`.
"""
from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter

from pai_core.paradigms.registry import Paradigm, build_plan, get_paradigm, paradigm_names, register_paradigm

from pai_core.paradigms import (  # noqa: E402,F401,I001  (registration; the order `pai list` shows)
    lottery_ticket, prune_after_training, prune_at_init, dynamic_sparse, supermask, sanity_checks, lr_rewinding,
    early_bird, instability)

_SPECS = tuple(get_paradigm(n).spec for n in paradigm_names())
ExperimentSpec = Annotated[Union[_SPECS], Field(discriminator="flow")]  # type: ignore[valid-type]
EXPERIMENT = TypeAdapter(ExperimentSpec)


def validate_spec(raw: Any) -> Any:
    """The registered paradigm's spec for `raw["flow"]` (raises pydantic's ValidationError)."""
    return EXPERIMENT.validate_python(raw)


__all__ = ["EXPERIMENT", "ExperimentSpec", "Paradigm", "build_plan", "get_paradigm", "paradigm_names",
           "register_paradigm", "validate_spec"]
