"""Dynamic sparse training: SET (Mocanu et al. 2018) and RigL (Evci et al. 2020). k1 = 0,
then the mask is updated while training: every `update_interval` iterations each layer
drops its smallest weights and regrows as many, at random (SET) or by dense-gradient
magnitude (RigL). The initial mask is prune.criterion (random) with prune.scope (ERK);
evaluation uses the final mask.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pai_core.callbacks import MaskUpdate, register_callback
from pai_core.dynamic import DynamicSparsity
from pai_core.paradigms.common import pretty
from pai_core.paradigms.registry import register_paradigm
from pai_core.plan import Plan, Round, dense_round, evaluate_node, mask_node, score_node, train_node
from pai_core.specs import ExperimentBase, Frozen, PruneSpec, schedule_help


METHODS = {"set": "Mocanu et al. 2018: drop the smallest weights, regrow as many at random",
           "rigl": "Evci et al. 2020: drop the smallest weights, regrow by dense-gradient magnitude"}


class DynamicSpec(Frozen):
    """How the mask moves while training."""
    method: Literal["set", "rigl"] = Field(description="set: regrow at random; rigl: by gradient magnitude")
    update_interval: int = Field(100, gt=0, description="iterations between mask updates")
    drop_fraction: float = Field(0.3, gt=0, lt=1, description="fraction of each layer's active weights moved "
                                                                 "(at the first update, when annealed)")
    end_fraction: float = Field(0.75, gt=0, le=1, description="no updates after this fraction of training")
    anneal: Literal["cosine", "constant"] | None = Field(
        None, description="drop fraction over time; None = the paper's (RigL: cosine, SET: constant)")
    grow_init: Literal["zero", "random"] | None = Field(
        None, description="value of a new connection; None = the paper's (RigL: zero, SET: random)")
    regrow_dropped: bool = Field(True, description="a weight dropped in an update may be regrown in it "
                                                   "(both references); false: grow only among the inactive")
    skip_step_on_update: bool | None = Field(
        None, description="no optimizer step on update iterations; None = the reference's (RigL: yes, SET: no)")

    def resolved(self) -> dict:
        """Every option with the method's paper default filled in: what the training runs, and its key."""
        given = self.model_dump(mode="json")
        return {k: (DynamicSparsity.paper_defaults(self.method).get(k) if v is None else v) for k, v in given.items()}


class OneShotPrune(PruneSpec):
    NM_REFUSED = ("dynamic_sparse cannot keep an N:M pattern: its mask updates drop and regrow weights anywhere "
                  "in a layer")
    schedule: Literal["one_shot"] = Field("one_shot", description=schedule_help("one_shot"))


class DynamicSparseSpec(ExperimentBase):
    flow: Literal["dynamic_sparse"] = "dynamic_sparse"
    prune: OneShotPrune = Field(description="the initial mask at init (criterion random, scope erk in the papers)")
    dynamic: DynamicSpec = Field(description="how the mask moves during training (SET, RigL)")

    @model_validator(mode="after")
    def _updates_happen(self) -> DynamicSparseSpec:
        """A mask update at every multiple of update_interval below end_fraction of training: none
        at all would train the initial mask statically while the spec says SET/RigL."""
        end = int(self.dynamic.end_fraction * self.total_iterations)
        if self.dynamic.update_interval >= end:
            raise ValueError(f"dynamic.update_interval: no mask update would happen: updates stop at iteration {end:,} "
                             f"(end_fraction {self.dynamic.end_fraction:g} of {self.total_iterations:,}); "
                             f"allowed: below {max(end, 1):,}")
        return self


@register_callback("dynamic")
def _dynamic(d: dict, total: int, key: str) -> MaskUpdate:
    return MaskUpdate(DynamicSparsity(d["method"], d["update_interval"], d["drop_fraction"],
                                      int(d["end_fraction"] * total), int(key[:12], 16), anneal=d["anneal"],
                                      grow_init=d["grow_init"], regrow_dropped=d["regrow_dropped"],
                                      skip_step_on_update=d["skip_step_on_update"]))


def plan(spec: DynamicSparseSpec) -> Plan:
    init, dense = dense_round(spec)
    density = spec.prune.round_densities()[-1]
    start_mask = mask_node(spec, score_node(spec, init, None), None, density)
    trained = train_node(spec, "sparse_train", init, spec.train, mask=start_mask,
                         dynamic=spec.dynamic.resolved())
    return Plan("dynamic_sparse", [dense, Round(1, spec.dynamic.method, density, start_mask, trained,
                                                 evaluate_node(spec, trained, None))])


def label(spec: DynamicSparseSpec, rnd: Round) -> str:
    return pretty(spec.dynamic.method)


PARADIGM = register_paradigm("dynamic_sparse", DynamicSparseSpec, plan, label,
                             "sparse training with a moving mask: SET (random regrowth), RigL (gradient regrowth)",
                             __doc__)
