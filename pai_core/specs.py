"""The pruning section every pruning paradigm shares, and the experiment base each paradigm's
spec extends (`pai_core/paradigms/<name>.py`); the model, data and training sections are in
spec_sections.py and re-exported here. Loading and the one-line errors: spec_io.py.

Every field is checked before any compute starts. Specs are frozen so a stage can never
change what it was keyed on. Bounds: rounds <= 1000 (the plan is built whole up front),
`experiment` <= 500 characters (MLflow's limit); the sections' own: spec_sections.py.
Schedules that must empty a layer, or whose min_density floors miss the target, are refused
(prune_checks.py); what the criterion itself asks of the spec, by criterion_checks.py.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from pai_core import criterion_checks, prune_checks
from pai_core.criteria import criterion_names
from pai_core.form_schema import form_schema, registry_enum
from pai_core.models import model_info, model_names
from pai_core.spec_sections import (LR_MAX, MAX_EPOCHS, MAX_ITERATIONS, MAX_NAME, SEED_LIMIT, DataSpec,  # noqa: F401
                                    Frozen, ModelSpec, Name, Seed, TrainSpec, _text, registered)
from pai_core.yaml_io import clip

MAX_ROUNDS = 1000
MAX_NM_GROUP = 1024  # N:M groups: hardware uses 4 or 8; any m up to this works
MAX_EXPERIMENT = 500  # MLflow: experiment names up to 500 characters


SCHEDULES = {"one_shot": "prune once to the target sparsity",
             "iterative": "prune `rate` of the remaining weights, `rounds` times",
             "gradual": "PaT: Zhu & Gupta's cubic ramp inside the fine-tune"}
SCOPES = {"global": "one ranking over all layers", "layerwise": "each layer to the same density",
          "erk": "Erdős–Rényi-kernel layer densities (Evci et al.)",
          "smart_ratio": "Su et al.'s random-ticket ratios: density ∝ (L-l+1)²+(L-l+1) by depth, classifier 30 %",
          "uniform_plus": "Gale et al.'s uniform+: a first conv dense, the last layer at least 20 %, the rest "
                          "at one density"}


def schedule_help(*allowed: str) -> str:
    """The schedule field's description, naming only the schedules this paradigm allows."""
    return "when pruning happens: " + "; ".join(f"{k}: {SCHEDULES[k]}" for k in allowed or SCHEDULES)


SCHEDULE_HELP = schedule_help("one_shot", "iterative")
SCOPE_HELP = "how the kept fraction is shared out: " + "; ".join(f"{k}: {v}" for k, v in SCOPES.items())
PRUNE_BIASES_HELP = "also prune biases (most papers prune weights only)"
STRUCTURES = {"unstructured": "single weights",
              "nm": "N:M sparsity: the n highest-scoring of every m consecutive input weights of each output row "
                    "(prune.n, prune.m; 2:4 by default; prune.nm_groups), one round at density n/m; dynamic_sparse "
                    "only with sr_ste; not early_bird"}
STRUCTURE_HELP = "what is pruned: " + "; ".join(f"{k}: {v}" for k, v in STRUCTURES.items())


def nm_sparsity(n: int, m: int) -> float:
    """The sparsity N:M gives: n of every m weights kept."""
    return 1 - n / m


def _lax_int(value: Any) -> int | None:
    """`value` as the int field would take it (`"2"` and `2.0` too), or None if it would not."""
    try:
        return TypeAdapter(int).validate_python(value)
    except ValidationError:
        return None


class PruneSpec(Frozen):
    """What every pruning paradigm shares: criterion, target, scope. A paradigm narrows the
    schedules it allows and adds its own fields in its own file. A paradigm whose masks cannot
    keep an N:M pattern says why in `NM_REFUSED`, and `structure: nm` is refused by name."""
    NM_REFUSED: ClassVar[str] = ""
    SELECTS_FILTERS: ClassVar[bool] = False  # its structure may be `filter` (paradigms/filters.py): whole-unit criteria apply
    criterion: str = Field("magnitude", description="a registered criterion (pai list)",
                           json_schema_extra=registry_enum(criterion_names))
    params: dict[str, Any] = Field(default_factory=dict, description="the criterion's own parameters")
    schedule: Literal["one_shot", "iterative"] = Field("one_shot", description=SCHEDULE_HELP)
    sparsity: float | None = Field(None, ge=0, lt=1, description="final fraction of prunable weights removed (0-1); "
                                                                  "structure nm: 1 - n/m, derived when unset")
    rate: float | None = Field(None, gt=0, lt=1, description="per round, fraction of the remaining weights removed (0-1)")
    rounds: int = Field(1, gt=0, description="pruning rounds (iterative)")
    scope: Literal["global", "layerwise", "erk", "smart_ratio", "uniform_plus"] = Field("global",
                                                                                     description=SCOPE_HELP)
    min_density: float = Field(0.0, ge=0, le=1, description="per-layer floor on the kept fraction")
    prune_biases: bool = Field(False, description=PRUNE_BIASES_HELP)
    ignore: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=100,
        description="prunable parameters kept dense and out of the sparsity, by name or fnmatch pattern (fc.weight, "
                    "conv1.*): open_lth's pruning_layers_to_ignore, RigL's dense first layer")
    layer_density: dict[Annotated[str, Field(min_length=1, max_length=200)], Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=dict, max_length=100,
        description="scope layerwise, one round: {parameter name or fnmatch pattern: density} for the layers it "
                    "names (structure filter: a family by its first layer's weight), the rest at the spec's "
                    "density: per-layer rates chosen from `pai sensitivity` (Li et al.'s ResNet-56-pruned-B)")
    on_collapse: Literal["error", "warn"] = Field("error", description="a mask that empties a layer or cuts every path")
    bn_mode: Literal["train", "eval"] | None = Field(
        None, description="BatchNorm mode while scoring; None = the criterion's paper default. "
                          "Running statistics are restored either way")
    structure: Literal["unstructured", "nm"] = Field("unstructured", description=STRUCTURE_HELP)
    n: int = Field(2, ge=1, description="structure nm: weights kept in every group of m (n < m)")
    m: int = Field(4, ge=2, le=MAX_NM_GROUP, description="structure nm: consecutive input weights per group; must "
                   "divide every layer's row (in_features, or in_channels × kernel for a conv)")
    nm_indivisible: Literal["error", "dense"] = Field(
        "error", description="structure nm: a layer whose row m does not divide (a first conv's 1×5×5 = 25) is "
                             "refused (error) or left dense (dense, as NVIDIA's ASP does)")
    nm_groups: Literal["rows", "channels"] = Field(
        "rows", description="structure nm: which m weights form a group. rows: m consecutive weights of "
                            "weight.reshape(out, -1) (a conv's in × kh × kw order); channels: m consecutive input "
                            "channels at one kernel position (a conv's order in NVIDIA's ASP and SR-STE's code, the "
                            "one sparse tensor cores read in NHWC). The same for a Linear")

    @model_validator(mode="before")
    @classmethod
    def _nm_sparsity(cls, data: Any) -> Any:
        """structure nm fixes the density at n/m: with neither sparsity nor rate given, the
        sparsity is 1 - n/m (a bad n or m is left to the field checks and `_structure`)."""
        if not isinstance(data, dict) or data.get("structure") != "nm":
            return data
        if data.get("sparsity") is not None or data.get("rate") is not None:
            return data
        n, m = _lax_int(data.get("n", 2)), _lax_int(data.get("m", 4))
        if n is not None and m is not None and 1 <= n < m <= MAX_NM_GROUP:
            data = {**data, "sparsity": nm_sparsity(n, m)}
        return data

    @field_validator("criterion")
    @classmethod
    def _known(cls, v: str) -> str:
        return registered(v, criterion_names(), "criterion")

    @field_validator("rounds")
    @classmethod
    def _plan_size(cls, v: int) -> int:
        if v > MAX_ROUNDS:
            raise ValueError(f"at most {MAX_ROUNDS} (got {clip(v)}): each round adds its stages to the plan, which "
                             "is built, keyed and shown whole before anything runs")
        return v

    @model_validator(mode="after")
    def _schedule(self) -> PruneSpec:
        criterion_checks.check_prune(self)
        self._structure()
        if self.schedule != "iterative":
            if self.rounds != 1:
                raise ValueError(f"{self.schedule} prunes in exactly 1 round; use schedule: iterative")
            if self.sparsity is None and self.rate is None:
                raise ValueError(f"{self.schedule} needs sparsity")
        elif self.sparsity is None and self.rate is None:
            raise ValueError("iterative needs rate (per round) or sparsity (final)")
        if self.sparsity is not None and self.rate is not None:
            implied = 1 - (1 - self.rate) ** self.rounds
            if not math.isclose(implied, self.sparsity, rel_tol=1e-9, abs_tol=1e-12):
                raise ValueError(
                    f"rate {self.rate} over {self.rounds} rounds gives sparsity {implied:.6g}, "
                    f"not {self.sparsity}; give one of them"
                )
        if self.layer_density:
            if self.scope != "layerwise" or self.structure == "nm":
                raise ValueError(f"layer_density: per-layer densities replace scope layerwise's one density; "
                                 f"allowed with scope layerwise (got {self.scope}"
                                 f"{', structure nm' if self.structure == 'nm' else ''})")
            if self.rounds != 1:
                raise ValueError(f"layer_density: the densities are the mask's, in one round; allowed with rounds: "
                                 f"1 (got {self.rounds})")
        return self

    def _structure(self) -> None:
        """N:M: n of every m weights per group, in one round, so the density is n/m and the
        options of a ranked selection (scope, floors, biases) do not apply."""
        if self.structure == "nm" and self.NM_REFUSED:
            raise ValueError(f"prune.structure: {self.NM_REFUSED}; allowed: unstructured")
        if self.structure != "nm":
            for field, default in (("n", 2), ("m", 4), ("nm_indivisible", "error"), ("nm_groups", "rows")):
                if getattr(self, field) != default:
                    raise ValueError(f"prune.{field}: only structure nm uses it (this one is {self.structure})")
            return
        if self.n >= self.m:
            raise ValueError(f"prune.n: must be < m: n of every m weights are kept (got n={self.n}, m={self.m})")
        target = nm_sparsity(self.n, self.m)
        rule = f"structure nm keeps {self.n} of every {self.m} weights (sparsity {target:.6g})"
        if self.rounds != 1:
            raise ValueError(f"prune.rounds: {rule} in a single round; allowed: 1 (got {clip(self.rounds)})")
        if self.schedule not in ("one_shot", "iterative"):
            raise ValueError(f"prune.schedule: {rule} in a single round; allowed: one_shot, or iterative with "
                             f"rounds 1 (got {self.schedule})")
        for field in ("sparsity", "rate"):
            given = getattr(self, field)
            if given is not None and not math.isclose(given, target, rel_tol=1e-9, abs_tol=1e-12):
                raise ValueError(f"prune.{field}: {rule}, not {given:.6g}; give {target:.6g} or leave it unset")
        if self.scope != "global":
            raise ValueError(f"prune.scope: structure nm gives every layer the density n/m itself; allowed: global "
                             f"(the default; got {self.scope})")
        if self.min_density:
            raise ValueError(f"prune.min_density: structure nm keeps {self.n}/{self.m} of every layer; allowed: 0")
        if self.prune_biases:
            raise ValueError("prune.prune_biases: structure nm groups each row's input weights, and a bias has none; "
                             "allowed: false")

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


class TrackingSpec(Frozen):
    """What MLflow receives; never part of a stage key."""
    copy_artifacts: bool = Field(
        False, description="also copy each round's weights and mask into MLflow (by default MLflow gets their "
                           "store key and sha256): for setups whose MLflow is the only shared storage")


def _experiment_schema(schema: dict[str, Any]) -> None:
    form_schema(schema)
    flow = schema.get("properties", {}).get("flow", {})
    flow.setdefault("description", f"the paradigm: {flow.get('const', 'one of pai list')} (fixed for a deployment)")


class ExperimentBase(Frozen):
    """What every experiment has; each paradigm's spec adds `flow: Literal[...]` and its sections."""
    model_config = ConfigDict(json_schema_extra=_experiment_schema)
    name: Name = Field("experiment", description="this experiment's name (MLflow run, artifact keys)")
    experiment: Annotated[str, Field(min_length=1, max_length=MAX_EXPERIMENT), AfterValidator(_text)] = Field(
        "pai-flow", description="MLflow experiment name")
    flow: str = Field(description="the paradigm (fixed for a deployment)")
    seed: Seed = Field(0, description="init seed (and data-order seed unless data.order_seed is set)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA where torch sees it, else CPU")
    model: ModelSpec = Field(description="the network")
    data: DataSpec = Field(description="the dataset and its batching")
    train: TrainSpec = Field(description="the (pre)training schedule")
    tracking: TrackingSpec = Field(TrackingSpec(), description="what MLflow receives")

    @model_validator(mode="after")
    def _model_takes_data(self) -> ExperimentBase:
        info = self.data.info
        problem = model_info(self.model.name).input_problem(info.in_shape, info.num_classes, self.model.params)
        if problem:
            raise ValueError(f"model.name: {self.model.name} cannot take {self.data.dataset} ({problem})")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: cuda, but torch sees no CUDA device on this machine; allowed here: auto, cpu")
        for field in ("train", "retrain"):
            train = getattr(self, field, None)
            total = train.total_iterations(self.data.iterations_per_epoch) if isinstance(train, TrainSpec) else 0
            if total and train.warmup_iterations >= total:
                raise ValueError(f"{field}.warmup_iterations: must be < the {total:,} training iterations")
            if total and train.bn_l1 and not model_info(self.model.name).has_batch_norm(self.model.params):
                with_bn = [m if model_info(m).batch_norm is True else f"{m} with {model_info(m).batch_norm}: true"
                           for m in model_names() if model_info(m).batch_norm]
                raise ValueError(f"{field}.bn_l1: network slimming's L1 acts on BatchNorm scales and this "
                                 f"{self.model.name} has none; allowed: 0, or a model with BatchNorm "
                                 f"({', '.join(with_bn)})")
        prune = getattr(self, "prune", None)
        if isinstance(prune, PruneSpec) and prune.ignore:
            prune_checks.check_ignore(self, prune.ignore, prune.prune_biases)
        if isinstance(prune, PruneSpec) and prune.layer_density:
            prune_checks.check_layer_density(self, prune)
        if isinstance(prune, PruneSpec):
            criterion_checks.check_model(prune, self.model.name, lambda: prune_checks.meta_model(self))
        if (units := self.pruned_units()) is not None:
            prune_checks.check_schedule(self.prune, *units)
        return self

    def pruned_units(self) -> tuple[prune_checks.Layers, str, str] | None:
        """(layers and shapes, scope, unit) that `prune`'s densities apply to, for prune_checks;
        None = nothing to check. A paradigm pruning other units (whole filters) overrides it."""
        prune = getattr(self, "prune", None)
        if not isinstance(prune, PruneSpec):
            return None
        if prune.structure == "filter":  # whole filters: the channel groups of each candidate family
            return [(f"{family}.weight", (n,)) for family, n in prune.filter_units(self)], prune.scope, "filters"
        return prune_checks.weight_layers(self, prune.prune_biases, prune.ignore), prune.scope, "weights"

    @property
    def order_seed(self) -> int:
        return self.seed if self.data.order_seed is None else self.data.order_seed

    @property
    def total_iterations(self) -> int:
        return self.train.total_iterations(self.data.iterations_per_epoch)

    def summary(self) -> str:
        """One line for `pai validate`: what this spec will produce."""
        prune = getattr(self, "prune", None)
        return f"final sparsity {prune.final_sparsity:.4f}" if isinstance(prune, PruneSpec) else self.flow
