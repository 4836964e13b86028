"""Typed artifact metadata: what each stage records beside its payload.

Every consumer (executor, tracking, sweep, report, CLI) reads these attributes instead of
dict keys, so a renamed or missing field fails where it is written, not in seven readers.
The info travels inside a `Ref` and is stored in the artifact's JSON; it is provenance and
results, never part of a stage key. Unknown extra fields are kept (`extra="allow"`), so an
artifact written by a newer stage still loads.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from typing import Annotated


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Arch(_Model):
    """Enough to rebuild the network's shape: registered model (name + params), input, classes."""
    model: dict[str, Any]
    in_shape: list[int]
    num_classes: int


class Best(_Model):
    """The evaluation with the highest val accuracy: LTH's early-stop point."""
    iteration: int
    val_acc: float
    test_acc: float


def _no_best(v: Any) -> Any:
    return v or None  # v0.1 artifacts wrote {} for "no evaluation yet"


class Info(_Model):
    """Common to every stage: how long it took and where it ran (provenance, not key)."""
    seconds: float | None = None
    computed_by: dict[str, Any] | None = None
    flow_run_id: str | None = Field(None, description="the Prefect flow run that computed it, if any")


class InitInfo(Info):
    arch: Arch
    iteration: int = 0


class IsometryInfo(InitInfo):
    """Re-initialised weights; per layer the singular values' min/max/mean before and after."""
    singular_values: dict[str, dict[str, dict[str, float]]] = Field(default_factory=dict)


class TrainInfo(Info):
    arch: Arch
    iteration: int
    history: list[dict[str, float]] = Field(default_factory=list)
    best: Annotated[Best | None, BeforeValidator(_no_best)] = None
    sparsity: float | None = None  # when the training was masked
    mask_updates: list[dict[str, float]] | None = None  # SET/RigL/gradual: what moved, when
    # dynamic sparse: in-time over-parameterization, the fraction of masked weights ever active
    # (total, per layer, after each mask update); None in artifacts made before it was tracked
    itop_rate: float | None = None
    itop_layers: dict[str, float] | None = None
    itop_history: list[dict[str, float]] | None = None
    stopped_early: dict[str, Any] | None = None  # a callback ended training (early-bird ticket)
    budget: dict[str, float] | None = None  # Scratch-B: the FLOP ratio and the stretched length


class ScoreInfo(Info):
    arch: Arch


class MaskInfo(Info):
    sparsity: float
    layers: dict[str, dict[str, float | int]]
    collapse: dict[str, Any] | None = None
    per_round: list[float] | None = None  # iterative pruning at fixed weights
    max_sparsity_without_collapse: float | None = None
    structured: dict[str, Any] | None = None  # filter pruning: parameter and FLOP counts


class SelectInfo(TrainInfo):
    """A learned mask over frozen weights (edge-popup, supermask)."""


class PhysicalEval(_Model):
    """The physically smaller dense net of filter pruning, evaluated on its own."""
    val_acc: float
    val_loss: float
    test_acc: float
    test_loss: float
    cost: dict[str, Any]


class EvalInfo(Info):
    val_acc: float
    val_loss: float
    test_acc: float
    test_loss: float
    sparsity: float
    layers: dict[str, dict[str, float | int]]
    best: Annotated[Best | None, BeforeValidator(_no_best)] = None
    iteration: int | None = None
    physical: PhysicalEval | None = None


class InterpolationInfo(Info):
    """The linear path between two copies trained under different SGD noise (instability
    analysis): per split, each α's error and loss, and the barriers."""
    splits: list[str]
    path: list[dict[str, float]]          # {"alpha", "<split>_err", "<split>_loss", ...} per α
    instability: dict[str, float]         # per split: max error on the path − mean of the ends' errors
    loss_barrier: dict[str, float]        # the same for the loss
    bn_stats: str
    distance: float                       # ‖w_A − w_B‖₂ over the interpolated weights
    relative_distance: float              # ... over ‖w_A‖₂
