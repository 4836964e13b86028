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
from pai_core.callbacks import MaskUpdate, register_callback
from pai_core.paradigms.common import nm_tag, pretty, scope_tag
from pai_core.paradigms.filters import FilterPrune
from pai_core.paradigms.registry import register_paradigm
from pai_core.plan import Plan, Round, dense_round, evaluate_node, mask_node, score_node, train_node
from pai_core.specs import ExperimentBase, Frozen, TrainSpec, schedule_help


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


GRADUAL_CRITERIA = ("magnitude", "lamp")  # scores of the current weights alone: cheap at every ramp step


class PaTPrune(FilterPrune):
    schedule: Literal["one_shot", "iterative", "gradual"] = Field(
        "one_shot", description=schedule_help("one_shot", "iterative", "gradual"))
    gradual: GradualSpec = Field(default_factory=GradualSpec, description="schedule: gradual")

    @model_validator(mode="after")
    def _options(self) -> PaTPrune:
        if self.schedule == "gradual" and self.sparsity is None:
            raise ValueError("gradual needs sparsity (the ramp's final sparsity)")
        if self.schedule == "gradual" and self.criterion not in GRADUAL_CRITERIA:
            raise ValueError(f"prune.criterion: gradual ranks the weights themselves at every step; allowed: "
                             f"{', '.join(GRADUAL_CRITERIA)} (got {self.criterion})")
        if self.structure == "filter" and self.schedule == "gradual":
            raise ValueError("prune.schedule: structure filter prunes one_shot or iterative; allowed: one_shot, "
                             "iterative")
        return self


class PruneAfterTrainingSpec(ExperimentBase):
    flow: Literal["prune_after_training"] = "prune_after_training"
    retrain: TrainSpec = Field(description="the fine-tune schedule")
    prune: PaTPrune = Field(description="what is pruned after training, and how")

    @property
    def retrain_spec(self) -> TrainSpec:
        return self.retrain


@register_callback("gradual")
def _gradual(g: dict, total: int, key: str) -> MaskUpdate:
    return MaskUpdate(gradual_lib.GradualMagnitude(g["sparsity"], int(g["start"] * total), int(g["end"] * total),
                                                   g["every"], g["scope"], g["min_density"],
                                                   g.get("criterion", "magnitude")))


def plan(spec: PruneAfterTrainingSpec) -> Plan:
    """Train; prune by the criterion; fine-tune the survivors; repeat for iterative."""
    _, dense = dense_round(spec)
    p = spec.prune
    rounds, weights, mask = [dense], dense.trained, None
    if p.schedule == "gradual":  # the mask is grown inside the fine-tune itself
        ft = train_node(spec, "finetune", weights, spec.retrain, mode="finetune", gradual={
            **p.gradual.model_dump(mode="json"), "sparsity": p.sparsity, "scope": p.scope,
            "min_density": p.min_density, "prune_biases": p.prune_biases, **({"ignore": p.ignore} if p.ignore else {}),
            **({"criterion": p.criterion} if p.criterion != "magnitude" else {})})  # magnitude's keys as they were
        return Plan("prune_after_training", [dense, Round(1, "gradual", 1 - p.sparsity, None, ft,
                                                          evaluate_node(spec, ft, None))])
    structure = p.mask_fields()
    for r, density in enumerate(p.round_densities(), start=1):
        mask = mask_node(spec, score_node(spec, weights, mask, density=density), mask, density, structure)
        weights = train_node(spec, "finetune", weights, spec.retrain, mask=mask, mode="finetune")
        rounds.append(Round(r, f"round {r}", density, mask, weights,
                            evaluate_node(spec, weights, mask, physical=p.physical)))
    return Plan("prune_after_training", rounds)


def label(spec: PruneAfterTrainingSpec, rnd: Round) -> str:
    p = spec.prune
    extra = [s for s in (p.schedule != "one_shot" and p.schedule, scope_tag(p), p.tag()) if s]
    return f"PaT {pretty(p.criterion)}{nm_tag(p)}" + (f" ({', '.join(extra)})" if extra else "")


PARADIGM = register_paradigm("prune_after_training", PruneAfterTrainingSpec, plan, label,
                             "PaT: prune a trained net (one-shot, iterative, gradual; weights or filters), "
                             "fine-tune", __doc__)
