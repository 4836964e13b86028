"""What a round's paradigm-specific outputs add to its MLflow run, as metrics: the instability
path (a curve over α) and a dynamic-sparse training's in-time over-parameterization rate (a
curve over mask updates). Each returns nothing for rounds without that output, so the tracker
calls both for every round."""
from __future__ import annotations

from typing import Any

from mlflow.entities import Metric

from pai_core.plan import Round
from pai_core.store import Ref


def itop_metrics(info: Any, now: int) -> list[Metric]:
    """A dynamic-sparse training's in-time over-parameterization rate: `itop_rate` and
    `itop/<layer>` at step 0, and `itop_history` at each mask update's iteration (a curve).
    Nothing for other trainings, or for an artifact made before R_s was tracked."""
    rate = getattr(info, "itop_rate", None)
    if rate is None:
        return []
    out = [Metric("itop_rate", float(rate), now, 0)]
    out += [Metric(f"itop/{name}", float(v), now, 0) for name, v in (getattr(info, "itop_layers", None) or {}).items()]
    return out + [Metric("itop_history", float(h["itop_rate"]), now, int(h["iteration"]))
                  for h in getattr(info, "itop_history", None) or []]


def analysis_metrics(rnd: Round, refs: dict[str, Ref], now: int) -> list[Metric]:
    """An instability row's path as metrics: each split's error and loss at step i (the i-th α,
    so MLflow charts the curve), and its barriers at step 0. Nothing for other rounds."""
    if rnd.analysis is None:
        return []
    info = refs[rnd.analysis.key].info
    out = [Metric(f"path/{k}", float(v), now, i) for i, row in enumerate(info.path) for k, v in row.items()]
    out += [Metric(f"instability/{s}", v, now, 0) for s, v in info.instability.items()]
    out += [Metric(f"loss_barrier/{s}", v, now, 0) for s, v in info.loss_barrier.items()]
    return out + [Metric("path/distance", info.distance, now, 0),
                  Metric("path/relative_distance", info.relative_distance, now, 0)]
