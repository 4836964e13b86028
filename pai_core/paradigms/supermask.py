"""Sparse selection: edge-popup (Ramanujan et al. 2020), Zhou et al.'s supermask (2019),
IteRand (Chijiwa et al. 2021) and biprop (Diffenderfer & Kailkhura 2021). k1 = k2 = 0,
f2 = f3 = identity: the mask is learned over frozen weights, which are never trained (IteRand
redraws the pruned ones from their init distribution every K_per steps; biprop binarizes them:
pai_core/supermask.py). There is no dense round: `train`
here is the score schedule (supermasks want a learning rate that would wreck weight
training); compare with another paradigm's.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from pai_core.paradigms.common import pretty
from pai_core.paradigms.registry import register_paradigm
from pai_core.plan import Node, Plan, Round, evaluate_node, init_node, train_data_fields
from pai_core.prune_checks import weight_layers
from pai_core.specs import MAX_ITERATIONS, ExperimentBase, Frozen
from pai_core.supermask import Selector


METHODS = {"edge_popup": "Ramanujan et al. 2020: top-k by |score| per layer, straight-through, fixed random weights",
           "supermask": "Zhou et al. 2019: Bernoulli(sigmoid(score)) masks over the frozen init",
           "iterand": "Chijiwa et al. 2021: edge-popup whose pruned weights are redrawn (rate r) every K_per steps",
           "biprop": "Diffenderfer & Kailkhura 2021: edge-popup over binarized weights α·sign(w) (multi-prize tickets)"}
EDGE_POPUP_LIKE = ("edge_popup", "iterand", "biprop")  # top-k by |score| per layer, `keep` of each


class Rerandomize(Frozen):
    """IteRand's redraw of the pruned weights; defaults: the paper's CIFAR-10 settings."""
    every: int = Field(300, ge=1, le=MAX_ITERATIONS,
                       description="K_per: score steps between redraws (paper: 300 on CIFAR-10, 1000 on ImageNet)")
    rate: float = Field(0.1, ge=0, le=1, description="r: each weight pruned at that moment is redrawn with "
                                                     "probability r (the reference's rerand_lambda; 0 = edge-popup)")
    timing: Literal["paper", "reference"] = Field(
        "paper", description="paper: after score steps K, 2K, ...; reference: the authors' code, before them "
                             "(after K-1, 2K-1, ... steps)")


class SelectionSpec(Frozen):
    """Learn a mask over frozen weights (the `train` section trains the scores)."""
    method: Literal["edge_popup", "supermask", "iterand", "biprop"] = Field(
        description="edge_popup: top-k by |score| per layer; supermask: Bernoulli(sigmoid(score)) samples; "
                    "iterand: edge_popup + pruned weights redrawn every K_per steps; biprop: edge_popup over "
                    "binary weights α·sign(w), α the mean |w| kept in the layer")
    keep: float = Field(0.5, gt=0, le=1, description="edge_popup, iterand, biprop: fraction of each layer kept")
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
        None, description="None = the paper's: signed Kaiming constant for edge_popup and iterand, the init "
                          "for supermask and biprop (iterand redraws from the same distribution; biprop binarizes)")
    rerandomize: Rerandomize | None = Field(None, description="iterand: when and how much to redraw (None = the "
                                                              "paper's every 300 steps, rate 0.1)")

    @model_validator(mode="after")
    def _edge_popup_scores(self) -> SelectionSpec:
        if self.method in EDGE_POPUP_LIKE and self.score_init == "constant":
            raise ValueError(f"score_init: {self.method} ranks scores, so they cannot start equal; allowed: uniform")
        if self.rerandomize is not None and self.method != "iterand":
            raise ValueError(f"rerandomize: only method iterand redraws weights, not {self.method}; "
                             "allowed: method iterand, or no rerandomize")
        return self

    @property
    def frozen_weights(self) -> str:
        return self.weights or ("signed_constant" if self.method in ("edge_popup", "iterand") else "init")

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
        if self.method == "iterand":
            out["rerandomize"] = (self.rerandomize or Rerandomize()).model_dump(mode="json")
        return out


class SupermaskSpec(ExperimentBase):
    flow: Literal["supermask"] = "supermask"
    selection: SelectionSpec = Field(description="how the mask is learned over frozen weights")

    @model_validator(mode="after")
    def _keep_fits(self) -> SupermaskSpec:
        """edge-popup keeps round(keep · n) of every layer: none at all would empty it. IteRand
        must redraw at least once before the score training ends."""
        if self.selection.method == "iterand":
            every, total = (self.selection.rerandomize or Rerandomize()).every, self.total_iterations
            if every >= total:
                raise ValueError(f"selection.rerandomize.every: {every:,} leaves no redraw inside the {total:,} score "
                                 f"steps; allowed: 1 to {total - 1:,}")
        if self.selection.method in EDGE_POPUP_LIKE:
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
    density = sel.keep if sel.method in EDGE_POPUP_LIKE else float("nan")
    return Plan("supermask", [Round(1, sel.method, density, None, select, evaluate_node(spec, select, None))])


def label(spec: SupermaskSpec, rnd: Round) -> str:
    return {"iterand": "IteRand", "biprop": "biprop (MPT-1/32)"}.get(spec.selection.method,
                                                                     pretty(spec.selection.method))


PARADIGM = register_paradigm("supermask", SupermaskSpec, plan, label,
                             "sparse selection: learn a mask over frozen weights "
                             "(edge-popup, Zhou's supermask, IteRand, biprop)",
                             __doc__)
