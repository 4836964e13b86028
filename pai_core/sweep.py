"""Sweeps: base specs × a grid of dotted overrides, expanded and validated before anything runs,
then reduced to the stages they actually need.

Stage keys make sharing free: nine specs that differ only in criterion and sparsity have one
init and one pretrain between them, so `unique_nodes` runs each shared stage once however
many specs ask for it. A notebook user gets the same deduplication without Prefect.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from pai_core import yaml_io
from pai_core.paradigms import build_plan
from pai_core.plan import Node, Plan
from pai_core.spec_io import SpecError, _one_line, load_spec, parse_spec, set_field
from pai_core.paradigms import ExperimentSpec
from pai_core.specs import Frozen, Name

MAX_SPECS = 2000  # base specs × grid points: every one is validated (and its plan built) up front


class DaskSpec(Frozen):
    """Where a sweep's stages run. Here: a LocalCluster of `workers` processes. In production:
    the `address` of a Dask scheduler whose workers sit on GPU machines, one per GPU."""
    address: str | None = Field(None, min_length=1, max_length=500,
                                description="tcp://scheduler:8786; None = a LocalCluster on this machine")
    workers: int = Field(2, ge=1, le=1024, description="LocalCluster worker processes")
    threads_per_worker: int = Field(1, ge=1, le=1024, description="stages one worker runs at once")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="what each stage claims, e.g. {GPU: 1}: a worker started with `--resources GPU=1` "
                    "then runs one stage at a time, whatever its thread count")


class SweepSpec(Frozen):
    name: Name = "sweep"
    base: list[ExperimentSpec] = Field(min_length=1, description="the specs the grid varies")
    grid: dict[str, list[Any]] = Field(default_factory=dict,
                                       description="dotted field -> values, e.g. prune.sparsity: [0.5, 0.9]")
    dask: DaskSpec = DaskSpec()

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for k, values in grid.items():
            if not values:
                raise ValueError(f"grid.{k}: give at least one value")
        return grid

    @model_validator(mode="after")
    def _bounded(self) -> SweepSpec:
        n = len(self.base) * math.prod(len(v) for v in self.grid.values())
        if n > MAX_SPECS:
            raise ValueError(f"grid: {len(self.base)} base specs × {n // len(self.base):,} grid points = {n:,} "
                             f"specs; at most {MAX_SPECS} (each is validated and planned before anything runs)")
        return self

    def expand(self) -> list[ExperimentSpec]:
        """Every base × grid point, validated; a bad point raises SpecError naming it.
        Identical specs (a grid value equal to the base's) are kept once."""
        keys = list(self.grid)
        out: dict[str, ExperimentSpec] = {}
        for base in self.base:
            raw = base.model_dump(mode="json")
            for values in itertools.product(*(self.grid[k] for k in keys)):
                point = dict(zip(keys, values))
                tag = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())
                try:
                    point_raw = yaml_io.plain(raw)
                    for k, v in point.items():
                        set_field(point_raw, k, yaml_io.plain(v))
                    if _criterion_changed(base, point):  # params belong to a criterion: take the new one's defaults
                        point_raw["prune"]["params"] = {}
                    if _nm_changed(point_raw, point):  # the base's sparsity was derived from its n:m: derive again
                        point_raw["prune"]["sparsity"] = None
                    spec = parse_spec(point_raw | ({"name": f"{base.name}[{tag}]"} if tag else {}))
                except SpecError as e:
                    raise SpecError(f"sweep {self.name}, base {base.name}, grid point {yaml_io.clip(point, 200)}: "
                                    f"{e}") from None
                out.setdefault(spec.model_dump_json(exclude={"name"}), spec)
        return list(out.values())


def _criterion_changed(base: ExperimentSpec, point: dict[str, Any]) -> bool:
    prune = getattr(base, "prune", None)
    criterion = (prune.get("criterion", "magnitude") if isinstance(prune, dict)  # a sanity spec holds its base's as a dict
                 else getattr(prune, "criterion", None))
    return (criterion is not None and "prune.params" not in point
            and point.get("prune.criterion", criterion) != criterion)


def _nm_changed(point_raw: dict[str, Any], point: dict[str, Any]) -> bool:
    """A grid point that sets prune.n or prune.m of an N:M spec, and not its sparsity: the base's
    sparsity (1 - n/m, filled in when the base was resolved) no longer holds."""
    prune = point_raw.get("prune")
    return (isinstance(prune, dict) and prune.get("structure") == "nm" and "prune.sparsity" not in point
            and bool({"prune.n", "prune.m"} & set(point)))


def load_sweep(path: str | Path) -> SweepSpec:
    """A sweep YAML; `base` entries may be spec paths (relative to the sweep file) or inline specs."""
    path = Path(path)
    raw = yaml_io.read(path, "sweep")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a sweep must be a mapping with base and grid")
    raw.setdefault("name", path.stem)
    bases = raw.get("base")
    bases = bases if isinstance(bases, list) else [bases]
    if len(bases) > MAX_SPECS:
        raise SpecError(f"{path}: base: at most {MAX_SPECS} specs, got {len(bases):,}")
    resolved = []
    for i, b in enumerate(bases):
        try:
            spec = load_spec(path.parent / b) if isinstance(b, str) else parse_spec(b)
        except SpecError as e:
            raise SpecError(f"{path}: base {i}: {e}") from None
        resolved.append(spec.model_dump(mode="json"))
    raw["base"] = resolved
    try:
        sweep = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(f"{path}: {_one_line(err, SweepSpec)}") from None
    sweep.expand()  # every grid point is checked now, before anything is submitted
    return sweep


def is_sweep_file(path: str | Path) -> bool:
    """A mapping with `base` and `grid`; a file that cannot be read is not (loading it as a
    spec then says why)."""
    try:
        raw = yaml_io.read(path, "sweep")
    except SpecError:
        return False
    return isinstance(raw, dict) and "grid" in raw and "base" in raw


def unique_nodes(plans: list[Plan]) -> list[Node]:
    """Every stage the plans need, once per stage key, upstream before downstream."""
    seen: dict[str, Node] = {}
    for plan in plans:
        for node in plan.nodes:
            seen.setdefault(node.key, node)
    return list(seen.values())


def plans_for(specs: list[ExperimentSpec]) -> list[Plan]:
    return [build_plan(s) for s in specs]
