"""Sparse selection: edge-popup (Ramanujan et al. 2020) and Zhou et al.'s supermask (2019).
k1 = k2 = 0, f2 = f3 = identity: the mask is learned over frozen weights, which are never
trained. There is no dense round: `train` here is the score schedule (supermasks want a
learning rate that would wreck weight training); compare with another paradigm's.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from pai_core.paradigms.common import pretty
from pai_core.paradigms.registry import register_paradigm
from pai_core.plan import Node, Plan, Round, evaluate_node, init_node, train_data_fields
from pai_core.prune_checks import weight_layers
from pai_core.specs import ExperimentBase, Frozen
from pai_core.supermask import Selector


METHODS = {"edge_popup": "Ramanujan et al. 2020: top-k by |score| per layer, straight-through, fixed random weights",
           "supermask": "Zhou et al. 2019: Bernoulli(sigmoid(score)) masks over the frozen init"}


class SelectionSpec(Frozen):
    """Learn a mask over frozen weights (the `train` section trains the scores)."""
    method: Literal["edge_popup", "supermask"] = Field(description="edge_popup: top-k by |score| per layer; "
                                                                   "supermask: Bernoulli(sigmoid(score)) samples")
    keep: float = Field(0.5, gt=0, le=1, description="edge_popup: fraction of each layer kept")
    evaluation: Literal["sampled", "expected", "sampled_mean", "expected_dense"] | None = Field(
        None, description="supermask: sampled_mean = mean accuracy of eval_samples Bernoulli masks (the "
                          "reference's, the default); expected = keep where σ(s) > 0.5; sampled = one mask; "
                          "expected_dense = w ⊙ σ(s)")
    score_init: Literal["constant", "uniform"] | None = Field(
        None, description="supermask: constant = every score at score_constant (the reference's, σ = 0.5); "
                          "uniform = U(±1/sqrt(fan_in)), edge-popup's")
    score_constant: float = Field(0.0, description="supermask, score_init constant: the starting score")
    eval_samples: int = Field(10, ge=1, le=1000, description="supermask, sampled_mean: masks averaged")
    weights: Literal["signed_constant", "init"] | None = Field(
        None, description="None = the paper's: signed Kaiming constant for edge_popup, the init for supermask")

    @model_validator(mode="after")
    def _edge_popup_scores(self) -> SelectionSpec:
        if self.method == "edge_popup" and self.score_init == "constant":
            raise ValueError("score_init: edge_popup ranks scores, so they cannot start equal; allowed: uniform")
        return self

    @property
    def frozen_weights(self) -> str:
        return self.weights or ("signed_constant" if self.method == "edge_popup" else "init")

    def resolved(self) -> dict:
        """What the select stage runs, the paper's defaults filled in; edge-popup's fields are the
        ones it always had, so its keys are unchanged."""
        out = {"method": self.method, "keep": self.keep, "weights": self.frozen_weights,
               "evaluation": self.evaluation or "sampled"}
        if self.method == "supermask":
            paper = Selector.paper_defaults("supermask")
            out |= {"evaluation": self.evaluation or paper["evaluation"],
                    "score_init": self.score_init or paper["score_init"], "score_constant": self.score_constant,
                    "eval_samples": self.eval_samples}
        return out


class SupermaskSpec(ExperimentBase):
    flow: Literal["supermask"] = "supermask"
    selection: SelectionSpec = Field(description="how the mask is learned over frozen weights")

    @model_validator(mode="after")
    def _keep_fits(self) -> SupermaskSpec:
        """edge-popup keeps round(keep · n) of every layer: none at all would empty it."""
        if self.selection.method == "edge_popup":
            for name, shape in weight_layers(self):
                if round(self.selection.keep * math.prod(shape)) < 1:
                    raise ValueError(f"selection.keep: {self.selection.keep:.6g} keeps 0 of the {math.prod(shape):,} "
                                     f"weights of {name}, so that layer would be empty")
        return self

    def summary(self) -> str:
        return f"{self.selection.method} selection"


def plan(spec: SupermaskSpec) -> Plan:
    init = init_node(spec)
    sel = spec.selection
    fields = {"selection": sel.resolved(),
              "data": train_data_fields(spec),
              "train": spec.train.key_fields()}
    select = Node("select", "select", fields, {"init": init})
    density = sel.keep if sel.method == "edge_popup" else float("nan")
    return Plan("supermask", [Round(1, sel.method, density, None, select, evaluate_node(spec, select, None))])


def label(spec: SupermaskSpec, rnd: Round) -> str:
    return pretty(spec.selection.method)


PARADIGM = register_paradigm("supermask", SupermaskSpec, plan, label,
                             "sparse selection: learn a mask over frozen weights (edge-popup, Zhou's supermask)",
                             __doc__)
