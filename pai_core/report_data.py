"""A report's data: every finished (spec, round) of a set of specs as a Point, read from the
store's evaluate stages (never computed), and Points aggregated over seeds into Groups, one per
method and planned density. Labels name what a researcher compares: the method, not the file."""
from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass

from pai_core import flops
from pai_core.paradigms import ExperimentSpec, build_plan, get_paradigm
from pai_core.plan import Round
from pai_core.store import Store

DENSE = "dense"  # the baseline's label; "dense [spec]" where a report spans several baselines
# Fields that only move a method along the density axis (a sweep), not onto another line.
_SWEEP = {"seed": True, "name": True, "experiment": True, "device": True, "tracking": True,
          "prune": {"sparsity", "rate", "rounds"}, "selection": {"keep"}, "sanity": {"round"}}


@dataclass(frozen=True)
class Point:
    """One finished (spec, round): `target` is the planned density, `density` the measured one."""
    spec: str
    method: str
    seed: int
    round: str
    target: float
    density: float
    test_acc: float
    val_acc: float
    layers: dict[str, float]
    setting: str  # "model on dataset", for titles
    flops: float = math.nan  # the masked net's share of the dense net's FLOPs (inference, one input)


@dataclass(frozen=True)
class Group:
    """A method at one target density, aggregated over seeds (sample std; 0 for one seed)."""
    method: str
    target: float   # planned density; for a learned mask (supermask) the measured mean
    measured: bool  # True when `target` is that measured mean
    density: float  # measured mean: where the point is drawn
    seeds: tuple[int, ...]
    test_mean: float
    test_std: float
    val_mean: float
    layers: dict[str, float]
    flops: float = math.nan  # mean share of the dense FLOPs


def method_label(spec: ExperimentSpec, rnd: Round) -> str:
    """What a researcher compares: the criterion / method, not the spec's file name."""
    if rnd.index == 0 and rnd.mask is None and rnd.name == DENSE:
        return DENSE
    return get_paradigm(spec.flow).label(spec, rnd)


def _identity(spec: ExperimentSpec, label: str) -> str:  # a dense baseline is its pretrain: model, data, train
    return spec.model_dump_json(include={"model", "data", "train"} if label == DENSE else None,
                                exclude=None if label == DENSE else _SWEEP)


# Sweep tags that only move a point along a line: its seed or its place on the density axis.
_POSITION_TAGS = {"seed", *(f for fields in _SWEEP.values() if isinstance(fields, set) for f in fields)}


def _line_name(name: str) -> str:
    """A sweep point's name less the tags a line spans (`base[lr=0.1,sparsity=0.9,seed=0]` ->
    `base[lr=0.1]`): seeds and swept sparsities share a line, so its label names neither."""
    m = re.fullmatch(r"(.*)\[([^\[\]]*)\]", name)
    if m is None:
        return name
    tags = [t for t in m.group(2).split(",") if t.partition("=")[0] not in _POSITION_TAGS]
    return m.group(1) + (f"[{','.join(tags)}]" if tags else "")


def collect(specs: list[ExperimentSpec], store: Store) -> tuple[list[Point], list[tuple[str, int, str]]]:
    """Every finished round as a Point, and every planned round not stored yet.

    Specs differing only by seed or swept sparsity share a method line; two sharing a label but
    differing otherwise (another lr) get their spec name appended rather than being averaged."""
    rows = [(s, r, method_label(s, r)) for s in specs for r in build_plan(s).rounds]
    owners: dict[str, dict[str, str]] = defaultdict(dict)  # label -> identity -> first spec name
    for s, _, label in rows:
        owners[label].setdefault(_identity(s, label), s.name)
    unique: dict[tuple[str, str], tuple[ExperimentSpec, Round]] = {}  # a shared artifact (dense) counts once
    for s, r, label in rows:
        if len(owners[label]) > 1:
            label = f"{label} [{_line_name(owners[label][_identity(s, label)])}]"
        unique.setdefault((label, r.evaluate.key), (s, r))
    points, missing = [], []
    for (label, key), (s, r) in unique.items():
        if (ref := store.get("evaluate", key)) is None:
            missing.append((s.name, s.seed, r.name))
            continue
        i = ref.info
        layers = {n: float(v["density"]) for n, v in i.layers.items() if n != "total"}
        points.append(Point(s.name, label, s.seed, r.name, r.density, 1 - i.sparsity, i.test_acc,
                            i.val_acc, layers, f"{s.model.name} on {s.data.dataset}", flops.spec_share(s, layers)))
    return points, missing


def aggregate(points: list[Point]) -> list[Group]:
    """Mean ± std over seeds per (method, *planned* density, to 1e-9), so seeds line up exactly.

    A learned mask has none (NaN): grouped by round, drawn at its mean measured density."""
    by: dict[tuple[str, float | str], list[Point]] = defaultdict(list)
    for p in points:
        by[(p.method, p.round if math.isnan(p.target) else round(p.target, 9))].append(p)
    groups = []
    for (method, _), ps in by.items():
        test, learned = [p.test_acc for p in ps], math.isnan(ps[0].target)
        density = statistics.fmean(p.density for p in ps)
        groups.append(Group(method, density if learned else ps[0].target, learned, density,
                            tuple(sorted(p.seed for p in ps)), statistics.fmean(test),
                            statistics.stdev(test) if len(test) > 1 else 0.0, statistics.fmean(p.val_acc for p in ps),
                            {n: statistics.fmean(p.layers[n] for p in ps if n in p.layers)
                             for n in dict.fromkeys(n for p in ps for n in p.layers)},
                            statistics.fmean(p.flops for p in ps)))
    return sorted(groups, key=lambda g: (not g.method.startswith(DENSE), g.method.casefold(), -g.target))
