"""Experiment specs: the survey's formula written down as validated data.

Every field is checked before any compute starts (loading and the one-line errors are in
spec_io.py). Specs are frozen so a stage can never change what it was keyed on.
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pai_core.criteria import criterion_names, get_criterion
from pai_core.data import dataset_info, dataset_names
from pai_core.models import model_names
from pai_core.structured import CHAIN_MODELS



def _registered(value: str, names: list[str], what: str) -> str:
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(names)}")
    return value


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(Frozen):
    name: str

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return _registered(v, model_names(), "model")


class DataSpec(Frozen):
    dataset: str
    batch_size: int = Field(60, gt=0)
    val_size: int | None = Field(None, ge=0, description="held out of train; None = dataset default")
    split_seed: int = 0
    order_seed: int | None = Field(None, description="data-order seed; None = experiment seed")

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str) -> str:
        return _registered(v, dataset_names(), "dataset")

    @model_validator(mode="after")
    def _val_fits(self) -> DataSpec:
        info = dataset_info(self.dataset)
        if self.val_size is not None and self.val_size >= info.train_size:
            raise ValueError(f"val_size must be < {info.train_size} for {self.dataset}")
        return self

    @property
    def train_examples(self) -> int:
        info = dataset_info(self.dataset)
        val = info.default_val_size if self.val_size is None else self.val_size
        return info.train_size - val

    @property
    def iterations_per_epoch(self) -> int:
        return math.ceil(self.train_examples / self.batch_size)


class TrainSpec(Frozen):
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    epochs: int | None = Field(None, gt=0)
    iterations: int | None = Field(None, gt=0)
    lr_schedule: Literal["constant", "step", "cosine"] = "constant"
    milestones: tuple[int, ...] = Field((), description="step schedule; in epochs if `epochs` is set, else iterations")
    gamma: float = Field(0.1, gt=0)
    warmup_iterations: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _length(self) -> TrainSpec:
        if (self.epochs is None) == (self.iterations is None):
            raise ValueError("set exactly one of epochs or iterations")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer sgd with momentum > 0")
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError("milestones must be strictly increasing")
        return self

    def total_iterations(self, iterations_per_epoch: int) -> int:
        return self.iterations if self.iterations is not None else self.epochs * iterations_per_epoch

    def milestone_iterations(self, iterations_per_epoch: int) -> tuple[int, ...]:
        unit = iterations_per_epoch if self.epochs is not None else 1
        return tuple(m * unit for m in self.milestones)


class GradualSpec(Frozen):
    """Zhu & Gupta's cubic ramp, as fractions of the fine-tune schedule."""
    every: int = Field(100, gt=0, description="iterations between pruning steps")
    start: float = Field(0.0, ge=0, lt=1, description="ramp begins at this fraction of training")
    end: float = Field(0.75, gt=0, le=1, description="target sparsity reached at this fraction")

    @model_validator(mode="after")
    def _order(self) -> GradualSpec:
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class PruneSpec(Frozen):
    criterion: str = "magnitude"
    params: dict[str, Any] = Field(default_factory=dict, description="the criterion's own parameters")
    schedule: Literal["one_shot", "iterative", "gradual"] = "one_shot"
    sparsity: float | None = Field(None, ge=0, lt=1, description="final fraction of prunable weights removed")
    rate: float | None = Field(None, gt=0, lt=1, description="per round, fraction of the remaining weights")
    rounds: int = Field(1, gt=0)
    scope: Literal["global", "layerwise", "erk"] = "global"
    min_density: float = Field(0.0, ge=0, le=1, description="per-layer floor on the kept fraction")
    prune_biases: bool = False
    on_collapse: Literal["error", "warn"] = Field("error", description="a mask that empties a layer or cuts every path")
    rewind_iter: int = Field(0, ge=0, description="LTH: 0 = original init, k = late rewinding to iteration k")
    reinit_control: bool = Field(False, description="LTH: also train each mask from a fresh random init")
    gradual: GradualSpec = Field(default_factory=GradualSpec, description="schedule: gradual (PaT)")
    structure: Literal["unstructured", "filter"] = Field("unstructured", description="filter: whole filters/neurons")
    filter_norm: Literal["l1", "l2"] = Field("l1", description="structure filter: how a filter's scores combine")
    physical: bool = Field(False, description="structure filter: also build and evaluate the smaller dense net")

    @field_validator("criterion")
    @classmethod
    def _known(cls, v: str) -> str:
        return _registered(v, criterion_names(), "criterion")

    @model_validator(mode="before")
    @classmethod
    def _synflow_default(cls, data: Any) -> Any:
        """SynFlow's own default: 100 score-and-prune rounds on the exponential schedule."""
        if isinstance(data, dict) and data.get("criterion") == "synflow" and "schedule" not in data:
            data = {**data, "schedule": "iterative", "rounds": data.get("rounds", 100)}
        return data

    @model_validator(mode="after")
    def _schedule(self) -> PruneSpec:
        get_criterion(self.criterion).Params(**self.params)  # reject unknown/ill-typed params now
        if self.schedule in ("one_shot", "gradual"):
            if self.rounds != 1:
                raise ValueError(f"{self.schedule} prunes in exactly 1 round; use schedule: iterative")
            if self.schedule == "gradual" and (self.sparsity is None or self.criterion != "magnitude"):
                raise ValueError("gradual needs sparsity and criterion magnitude (Zhu & Gupta)")
            if self.sparsity is None and self.rate is None:
                raise ValueError("one_shot needs sparsity")
        else:
            if self.sparsity is None and self.rate is None:
                raise ValueError("iterative needs rate (per round) or sparsity (final)")
        if self.sparsity is not None and self.rate is not None:
            implied = 1 - (1 - self.rate) ** self.rounds
            if not math.isclose(implied, self.sparsity, rel_tol=1e-9, abs_tol=1e-12):
                raise ValueError(
                    f"rate {self.rate} over {self.rounds} rounds gives sparsity {implied:.6g}, "
                    f"not {self.sparsity}; give one of them"
                )
        return self

    @property
    def per_round_rate(self) -> float:
        if self.rate is not None:
            return self.rate
        return 1 - (1 - self.sparsity) ** (1 / self.rounds)

    def round_densities(self) -> list[float]:
        """Density after each pruning round: (1 - rate)^r of the prunable weights."""
        return [(1 - self.per_round_rate) ** r for r in range(1, self.rounds + 1)]

    @property
    def final_sparsity(self) -> float:
        return 1 - self.round_densities()[-1]


class SanitySpec(Frozen):
    """Sanity checks (Frankle et al. 2021; Su et al. 2020) on one round's mask of a base paradigm."""
    base: Literal["lottery_ticket", "prune_after_training", "prune_at_init"]
    round: int | None = Field(None, ge=1, description="which pruning round's mask; None = the last")
    checks: tuple[Literal["reinit", "shuffle", "invert"], ...] = ("reinit", "shuffle", "invert")


class DynamicSpec(Frozen):
    """Dynamic sparse training; the initial mask is prune.criterion (random) with prune.scope (erk)."""
    method: Literal["set", "rigl"]
    update_interval: int = Field(100, gt=0, description="iterations between mask updates")
    drop_fraction: float = Field(0.3, gt=0, lt=1, description="initial fraction of active weights moved; cosine-annealed")
    end_fraction: float = Field(0.75, gt=0, le=1, description="no updates after this fraction of training")


class SelectionSpec(Frozen):
    """Sparse selection: learn a mask over frozen weights (the `train` section trains the scores)."""
    method: Literal["edge_popup", "supermask"]
    keep: float = Field(0.5, gt=0, le=1, description="edge_popup: fraction of each layer kept")
    evaluation: Literal["sampled", "expected"] = Field("sampled", description="supermask: how it is evaluated")
    weights: Literal["signed_constant", "init"] | None = Field(
        None, description="None = the paper's: signed Kaiming constant for edge_popup, the init for supermask")

    @property
    def frozen_weights(self) -> str:
        return self.weights or ("signed_constant" if self.method == "edge_popup" else "init")


class ExperimentSpec(Frozen):
    name: str = "experiment"
    experiment: str = Field("pai-flow", description="MLflow experiment name")
    flow: Literal["lottery_ticket", "prune_after_training", "prune_at_init", "sanity_checks", "dynamic_sparse",
                  "supermask"]
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelSpec
    data: DataSpec
    train: TrainSpec
    retrain: TrainSpec | None = Field(None, description="LTH: defaults to train; PaT: the fine-tune schedule")
    # prune_at_init: `prune.rounds` are score-and-prune iterations at the init (SynFlow's
    # exponential schedule is rounds=100 with the final sparsity), then one training.
    prune: PruneSpec | None = Field(None, description="every flow but supermask")
    selection: SelectionSpec | None = Field(None, description="supermask: edge-popup or Zhou's supermask")
    sanity: SanitySpec | None = Field(None, description="sanity_checks: the base paradigm and its round")
    dynamic: DynamicSpec | None = Field(None, description="dynamic_sparse: SET or RigL settings")

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        for section, flow_name in (("sanity", "sanity_checks"), ("dynamic", "dynamic_sparse"),
                                   ("selection", "supermask")):
            if (self.flow == flow_name) != (getattr(self, section) is not None):
                raise ValueError(f"{section} is set exactly when flow is {flow_name}")
        if self.flow == "supermask":
            if self.prune is not None or self.retrain is not None:
                raise ValueError("supermask learns its mask: prune and retrain do not apply")
            return self
        if self.prune is None:
            raise ValueError(f"prune is required for flow {self.flow}")
        total = self.train.total_iterations(self.data.iterations_per_epoch)
        if self.prune.rewind_iter >= total:
            raise ValueError(f"prune.rewind_iter must be < the {total} training iterations")
        if self.flow == "dynamic_sparse" and (self.prune.schedule != "one_shot" or self.retrain is not None):
            raise ValueError("dynamic_sparse starts from a one_shot mask at init and trains once")
        flow = self.sanity.base if self.sanity else self.flow
        if self.sanity and self.sanity.round is not None and self.sanity.round > (
                1 if flow == "prune_at_init" else self.prune.rounds):
            raise ValueError("sanity.round is beyond the base paradigm's pruning rounds")
        if self.prune.physical and self.prune.structure != "filter":
            raise ValueError("prune.physical removes whole filters: it needs structure filter")
        if self.prune.structure == "filter":
            if flow != "prune_after_training" or self.prune.schedule == "gradual":
                raise ValueError("structure filter is a prune_after_training option (one_shot or iterative)")
            if self.model.name not in CHAIN_MODELS or self.prune.scope != "layerwise":
                raise ValueError("structure filter needs scope layerwise and a chain-shaped model; "
                                 f"allowed: {', '.join(CHAIN_MODELS)}")
        if self.prune.schedule == "gradual" and flow != "prune_after_training":
            raise ValueError("schedule gradual is a prune_after_training schedule")
        if flow == "prune_after_training":
            if self.retrain is None:
                raise ValueError("prune_after_training needs retrain (the fine-tune schedule)")
            if self.prune.rewind_iter or self.prune.reinit_control:
                raise ValueError("rewind_iter and reinit_control are lottery_ticket options")
        if flow == "prune_at_init":
            if self.retrain is not None or self.prune.rewind_iter or self.prune.reinit_control:
                raise ValueError("prune_at_init trains once from the init: retrain, rewind_iter and "
                                 "reinit_control do not apply")
        if flow == "lottery_ticket":
            if self.prune.schedule != "iterative":
                raise ValueError("lottery_ticket prunes iteratively; set prune.schedule: iterative")
            if self.retrain is not None and self.prune.rewind_iter and self.retrain.optimizer != self.train.optimizer:
                raise ValueError("late rewinding restores optimizer state; retrain.optimizer must equal train.optimizer")
        return self

    @property
    def order_seed(self) -> int:
        return self.seed if self.data.order_seed is None else self.data.order_seed

    @property
    def retrain_spec(self) -> TrainSpec:
        return self.retrain or self.train
