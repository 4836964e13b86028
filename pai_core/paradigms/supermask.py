"""Sparse selection: edge-popup (Ramanujan et al. 2020) and Zhou et al.'s supermask (2019).
k1 = k2 = 0, f2 = f3 = identity: the mask is learned over frozen weights, which are never
trained. There is no dense round: `train` here is the score schedule (supermasks want a
learning rate that would wreck weight training); compare with another paradigm's.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pai_core.paradigms.common import pretty
from pai_core.paradigms.registry import register_paradigm
from pai_core.plan import Node, Plan, Round, data_fields, evaluate_node, init_node
from pai_core.specs import ExperimentBase, Frozen


METHODS = {"edge_popup": "Ramanujan et al. 2020: top-k by |score| per layer, straight-through, fixed random weights",
           "supermask": "Zhou et al. 2019: Bernoulli(sigmoid(score)) masks over the frozen init"}


class SelectionSpec(Frozen):
    """Learn a mask over frozen weights (the `train` section trains the scores)."""
    method: Literal["edge_popup", "supermask"] = Field(description="edge_popup: top-k by |score| per layer; "
                                                                   "supermask: Bernoulli(sigmoid(score)) samples")
    keep: float = Field(0.5, gt=0, le=1, description="edge_popup: fraction of each layer kept")
    evaluation: Literal["sampled", "expected"] = Field("sampled", description="supermask: how it is evaluated")
    weights: Literal["signed_constant", "init"] | None = Field(
        None, description="None = the paper's: signed Kaiming constant for edge_popup, the init for supermask")

    @property
    def frozen_weights(self) -> str:
        return self.weights or ("signed_constant" if self.method == "edge_popup" else "init")


class SupermaskSpec(ExperimentBase):
    flow: Literal["supermask"] = "supermask"
    selection: SelectionSpec

    def summary(self) -> str:
        return f"{self.selection.method} selection"


def plan(spec: SupermaskSpec) -> Plan:
    init = init_node(spec)
    sel = spec.selection
    fields = {"selection": {**sel.model_dump(mode="json"), "weights": sel.frozen_weights},
              "data": {**data_fields(spec), "batch_size": spec.data.batch_size, "order_seed": spec.order_seed},
              "train": spec.train.model_dump(mode="json")}
    select = Node("select", "select", fields, {"init": init})
    density = sel.keep if sel.method == "edge_popup" else float("nan")
    return Plan("supermask", [Round(1, sel.method, density, None, select, evaluate_node(spec, select, None))])


def label(spec: SupermaskSpec, rnd: Round) -> str:
    return pretty(spec.selection.method)


PARADIGM = register_paradigm("supermask", SupermaskSpec, plan, label,
                             "sparse selection: learn a mask over frozen weights (edge-popup, Zhou's supermask)",
                             __doc__)
