"""Pruning at initialization: SNIP, GraSP, SynFlow, random, magnitude at init. k1 = k2 = 0,
f3 = train from scratch. One-shot scores once; iterative scores and prunes `rounds` times
at the init, re-ranking only the survivors (SynFlow's default: 100 rounds on the
exponential schedule). The dense round is the same node as LTH's and PaT's pretrain, so it
is shared, not retrained.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pai_core.paradigms.common import nm_tag, pretty
from pai_core.paradigms.registry import register_paradigm
from pai_core.plan import Plan, Round, dense_round, evaluate_node, iterative_mask_node, mask_node, score_node, train_node
from pai_core.specs import ExperimentBase, PruneSpec

SYNFLOW_ROUNDS = 100  # Tanaka et al.: 100 score-and-prune rounds at fixed weights


class AtInitPrune(PruneSpec):
    @model_validator(mode="before")
    @classmethod
    def _synflow_default(cls, data: Any) -> Any:
        """SynFlow's own default, here and only here (rounds at fixed weights at init): 100
        score-and-prune rounds on the exponential schedule. Not for N:M, which prunes once."""
        if (isinstance(data, dict) and data.get("criterion") == "synflow" and "schedule" not in data
                and data.get("structure") != "nm"):
            data = {**data, "schedule": "iterative", "rounds": data.get("rounds", SYNFLOW_ROUNDS)}
        return data


class PruneAtInitSpec(ExperimentBase):
    flow: Literal["prune_at_init"] = "prune_at_init"
    prune: AtInitPrune = Field(description="the criterion scoring the network at init")


def plan(spec: PruneAtInitSpec) -> Plan:
    init, dense = dense_round(spec)
    densities = spec.prune.round_densities()
    if spec.prune.schedule == "one_shot" or spec.prune.structure == "nm":  # N:M: one round, one mask
        mask = mask_node(spec, score_node(spec, init, None), None, densities[-1])
    else:
        mask = iterative_mask_node(spec, init, densities)
    trained = train_node(spec, "sparse_train", init, spec.train, mask=mask)
    return Plan("prune_at_init", [dense, Round(1, spec.prune.criterion, densities[-1], mask, trained,
                                                evaluate_node(spec, trained, mask))])


def label(spec: PruneAtInitSpec, rnd: Round) -> str:
    p = spec.prune
    return pretty(p.criterion) + nm_tag(p) + ("" if p.schedule == "one_shot" else f" ({p.schedule})")


PARADIGM = register_paradigm("prune_at_init", PruneAtInitSpec, plan, label,
                             "PaI: a mask from the init's scores (SNIP, GraSP, SynFlow, ...), then train from scratch",
                             __doc__)
