"""Prune after training (PaT): k1 = k2 = K, f3 = fine-tune. One-shot, iterative (prune and
fine-tune, repeated), or gradual (Zhu & Gupta's cubic ramp, pruning every n steps inside the
fine-tune). Unstructured, `structure: nm` (n of every m consecutive input weights, one
round), or `structure: filter`: whole filters/neurons by the l1/l2 norm (or max) of
their scores, with their dependent input channels, per layer (`scope: layerwise`) or by one
ranking over all layers (`scope: global`); `physical: true` also builds, evaluates and stores
the physically smaller dense net.

Network slimming (Liu et al. 2017) is `train.bn_l1` (L1 on the BN scales while pretraining),
then `criterion: bn_scale` with `structure: filter, scope: global`: one threshold over every
BN |γ|, only the channels a BatchNorm follows. Molchanov et al.'s (2019) filter Taylor is
`criterion: taylor_filter` with `structure: filter, scope: global`. Both give every weight of a
unit the unit's own score, so the filter score is its max (`filter_norm` defaults to max).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pai_core import gradual as gradual_lib
from pai_core import channel_graph, structured
from pai_core.callbacks import MaskUpdate, register_callback
from pai_core.models import model_info, model_names
from pai_core.paradigms.common import nm_tag, pretty
from pai_core.paradigms.registry import register_paradigm
from pai_core.plan import Plan, Round, dense_round, evaluate_node, mask_node, score_node, train_node
from pai_core.prune_checks import meta_model
from pai_core.specs import STRUCTURES as SHARED_STRUCTURES
from pai_core.specs import ExperimentBase, Frozen, PruneSpec, TrainSpec, schedule_help


STRUCTURES = {**SHARED_STRUCTURES, "filter": "whole filters/neurons with every channel tied to them: the inputs "
                                             "they feed, and residual adds (prune_after_training only)"}
# Criteria that score whole units (one score spread over a unit's weights): filter structure
# only, filter_norm max, and the layers they prune by default.
UNIT_CRITERIA = {"bn_scale": "batch_norm", "taylor_filter": "all"}


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


class PaTPrune(PruneSpec):
    SELECTS_FILTERS = True
    schedule: Literal["one_shot", "iterative", "gradual"] = Field(
        "one_shot", description=schedule_help("one_shot", "iterative", "gradual"))
    gradual: GradualSpec = Field(default_factory=GradualSpec, description="schedule: gradual")
    structure: Literal["unstructured", "nm", "filter"] = Field(
        "unstructured", description="what is pruned: " + "; ".join(f"{k}: {v}" for k, v in STRUCTURES.items()))
    filter_norm: Literal["l1", "l2", "max"] | None = Field(
        None, description="structure filter: how a filter's per-weight scores combine into one: l1 or l2 norm, or "
                          "max; None = max for criteria that score whole units (bn_scale, taylor_filter), else l1")
    filter_layers: Literal["all", "batch_norm", "unshared"] | None = Field(
        None, description="structure filter: the channels that may go: all (every layer's but the output's), "
                          "batch_norm (those BatchNorms follow: network slimming's channels) or unshared (those "
                          "one layer makes alone: Li et al.'s ResNets keep the residual stream); None = batch_norm "
                          "for bn_scale, else all")
    physical: bool = Field(False, description="structure filter: also build and evaluate the smaller dense net")

    @model_validator(mode="after")
    def _options(self) -> PaTPrune:
        if self.schedule == "gradual" and (self.sparsity is None or self.criterion != "magnitude"):
            raise ValueError("gradual needs sparsity and criterion magnitude (Zhu & Gupta)")
        if self.physical and self.structure != "filter":
            raise ValueError("prune.physical removes whole filters: it needs structure filter")
        if self.structure != "filter":
            for field in ("filter_norm", "filter_layers"):
                if getattr(self, field) is not None:
                    raise ValueError(f"prune.{field}: only structure filter uses it (this one is {self.structure})")
            if self.criterion in UNIT_CRITERIA:
                raise ValueError(f"prune.structure: {self.criterion} scores whole filters/neurons; allowed: filter")
            return self
        if self.schedule == "gradual":
            raise ValueError("prune.schedule: structure filter prunes one_shot or iterative; allowed: one_shot, "
                             "iterative")
        if self.scope not in ("layerwise", "global"):
            raise ValueError(f"prune.scope: structure filter ranks the filters of each layer (layerwise) or of all "
                             f"layers together (global); allowed: layerwise, global (got {self.scope})")
        if self.criterion in UNIT_CRITERIA and self.filter_norm not in (None, "max"):
            raise ValueError(f"prune.filter_norm: {self.criterion} gives every weight of a unit the unit's score, so "
                             f"a norm would weight it by the filter's size; allowed: max (or unset)")
        if self.criterion == "bn_scale" and self.filter_layers not in (None, "batch_norm"):
            raise ValueError("prune.filter_layers: bn_scale scores the channels a BatchNorm follows; allowed: "
                             "batch_norm (or unset)")
        return self

    @property
    def norm(self) -> str:
        """filter_norm as used: max for criteria that score whole units, l1 otherwise."""
        return self.filter_norm or ("max" if self.criterion in UNIT_CRITERIA else "l1")

    @property
    def unit_layers(self) -> str:
        """filter_layers as used: the criterion's own (batch_norm for bn_scale), else all."""
        return self.filter_layers or UNIT_CRITERIA.get(self.criterion, "all")


class PruneAfterTrainingSpec(ExperimentBase):
    flow: Literal["prune_after_training"] = "prune_after_training"
    retrain: TrainSpec = Field(description="the fine-tune schedule")
    prune: PaTPrune = Field(description="what is pruned after training, and how")

    @model_validator(mode="after")
    def _units(self) -> PruneAfterTrainingSpec:
        if self.prune.structure == "filter":
            self.filter_units()
        return self

    def filter_units(self) -> list[tuple[str, int]]:
        """(family, groups) that structure filter prunes (channel_graph); refused by field when the
        net's channels cannot be grouped or none may go."""
        if self.prune.unit_layers == "batch_norm" and not model_info(self.model.name).has_batch_norm(
                self.model.params):
            field = "criterion" if self.prune.filter_layers is None else "filter_layers"
            what = "bn_scale ranks BatchNorm scales" if field == "criterion" else "batch_norm prunes BN channels"
            with_bn = [m if model_info(m).batch_norm is True else f"{m} with {model_info(m).batch_norm}: true"
                       for m in model_names() if model_info(m).batch_norm]
            raise ValueError(f"prune.{field}: {what}, and this {self.model.name} has no BatchNorm; allowed: a "
                             f"model with BatchNorm ({', '.join(with_bn)})")
        try:
            units = structured.unit_layers(meta_model(self), self.prune.unit_layers, self.prune.ignore)
        except channel_graph.ChannelGraphError as e:
            raise ValueError(f"prune.structure: filter needs the channel groups of {self.model.name}: {e}; "
                             f"allowed: unstructured, nm") from e
        if not units:
            field = "filter_layers" if self.prune.filter_layers is not None else "structure"
            raise ValueError(f"prune.{field}: {self.model.name} has no channel group that "
                             f"{self.prune.unit_layers} filter pruning may remove")
        return units

    @property
    def retrain_spec(self) -> TrainSpec:
        return self.retrain

    def pruned_units(self) -> tuple | None:
        """Whole filters: the densities apply to the channel groups of the candidate families
        (a chain layer's filters, a residual stream's channels), per family or all together
        (structured.select_filters)."""
        if self.prune.structure != "filter":
            return super().pruned_units()
        layers = [(f"{family}.weight", (n,)) for family, n in self.filter_units()]
        return layers, self.prune.scope, "filters"


@register_callback("gradual")
def _gradual(g: dict, total: int, key: str) -> MaskUpdate:
    return MaskUpdate(gradual_lib.GradualMagnitude(g["sparsity"], int(g["start"] * total), int(g["end"] * total),
                                                   g["every"], g["scope"], g["min_density"]))


def plan(spec: PruneAfterTrainingSpec) -> Plan:
    """Train; prune by the criterion; fine-tune the survivors; repeat for iterative."""
    _, dense = dense_round(spec)
    p = spec.prune
    rounds, weights, mask = [dense], dense.trained, None
    if p.schedule == "gradual":  # the mask is grown inside the fine-tune itself
        ft = train_node(spec, "finetune", weights, spec.retrain, mode="finetune", gradual={
            **p.gradual.model_dump(mode="json"), "sparsity": p.sparsity, "scope": p.scope,
            "min_density": p.min_density, "prune_biases": p.prune_biases, **({"ignore": p.ignore} if p.ignore else {})})
        return Plan("prune_after_training", [dense, Round(1, "gradual", 1 - p.sparsity, None, ft,
                                                          evaluate_node(spec, ft, None))])
    structure = None
    if p.structure == "filter":  # a default filter_layers adds no field: earlier filter masks keep their keys
        structure = {"structure": "filter", "filter_norm": p.norm}
        structure |= {"filter_layers": p.unit_layers} if p.unit_layers != "all" else {}
        structure |= {"ignore": p.ignore} if p.ignore else {}  # the filters of these layers stay
    for r, density in enumerate(p.round_densities(), start=1):
        mask = mask_node(spec, score_node(spec, weights, mask), mask, density, structure)
        weights = train_node(spec, "finetune", weights, spec.retrain, mask=mask, mode="finetune")
        rounds.append(Round(r, f"round {r}", density, mask, weights,
                            evaluate_node(spec, weights, mask, physical=p.physical)))
    return Plan("prune_after_training", rounds)


def label(spec: PruneAfterTrainingSpec, rnd: Round) -> str:
    p = spec.prune
    units = p.unit_layers if p.unit_layers != UNIT_CRITERIA.get(p.criterion, "all") else ""  # unshared: Li et al.
    extra = [s for s in (p.schedule != "one_shot" and p.schedule,
                         p.structure == "filter" and " ".join(filter(None, ("filter", units)))) if s]
    return f"PaT {pretty(p.criterion)}{nm_tag(p)}" + (f" ({', '.join(extra)})" if extra else "")


PARADIGM = register_paradigm("prune_after_training", PruneAfterTrainingSpec, plan, label,
                             "PaT: prune a trained net (one-shot, iterative, gradual; weights or filters), "
                             "fine-tune", __doc__)
