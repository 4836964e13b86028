"""Pruning at initialization: SNIP, GraSP, SynFlow, FORCE, random (with random-ticket
ratios: `scope: smart_ratio`), magnitude at init. k1 = k2 = 0, f3 = train from scratch.
One-shot scores once; iterative scores and prunes `rounds` times at the init, re-ranking
the survivors (FORCE: every weight) on the net masked so far (SynFlow's default: 100 rounds,
FORCE's 60, on the exponential schedule). `init_after_mask: isometry` re-initialises the
kept weights towards approximate isometry (Lee et al. 2020) before training. The dense
round is the same node as LTH's and PaT's pretrain, so it is shared, not retrained.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pai_core.criteria.force import FORCE_ROUNDS
from pai_core.isometry import ISOMETRY_LR, ISOMETRY_STEPS
from pai_core.paradigms.common import nm_tag, pretty, scope_tag
from pai_core.paradigms.registry import register_paradigm
from pai_core.plan import (Node, Plan, Round, dense_round, evaluate_node, iterative_mask_node, mask_node, score_node,
                           train_node)
from pai_core.paradigms.filters import FilterPrune
from pai_core.specs import ExperimentBase

# Score-and-prune rounds at fixed weights, on the exponential schedule, as each paper runs it.
# Tanaka et al. 2020; de Jorge et al. 2021; Wang et al. 2023 (NTK-SAP's scripts/run.sh: --prune-epochs 20)
DEFAULT_ROUNDS = {"synflow": 100, "force": FORCE_ROUNDS, "ntk_sap": 20}
INIT_AFTER_MASK = {"keep": "train the kept init weights as they are",
                   "isometry": "first re-initialise them towards approximate isometry: min ||(M⊙W)(M⊙W)ᵀ − I||_F "
                               "per layer, SGD lr 0.1 × 10,000 steps (Lee et al. 2020)"}


class AtInitPrune(FilterPrune):
    init_after_mask: Literal["keep", "isometry"] = Field(
        "keep", description="; ".join(f"{k}: {v}" for k, v in INIT_AFTER_MASK.items()))

    @model_validator(mode="before")
    @classmethod
    def _paper_rounds(cls, data: Any) -> Any:
        """SynFlow's, FORCE's and NTK-SAP's own default, here and only here (rounds at fixed weights at
        init): their papers' score-and-prune rounds on the exponential schedule. Not for N:M,
        which prunes once."""
        if (isinstance(data, dict) and isinstance(data.get("criterion"), str) and data["criterion"] in DEFAULT_ROUNDS
                and "schedule" not in data
                and data.get("structure") != "nm"):
            data = {**data, "schedule": "iterative", "rounds": data.get("rounds", DEFAULT_ROUNDS[data["criterion"]])}
        return data


class PruneAtInitSpec(ExperimentBase):
    flow: Literal["prune_at_init"] = "prune_at_init"
    prune: AtInitPrune = Field(description="the criterion scoring the network at init")


def plan(spec: PruneAtInitSpec) -> Plan:
    init, dense = dense_round(spec)
    densities = spec.prune.round_densities()
    filters = spec.prune.mask_fields()
    if spec.prune.schedule == "one_shot" or spec.prune.structure == "nm":  # N:M: one round, one mask
        mask = mask_node(spec, score_node(spec, init, None, density=densities[-1]), None, densities[-1], filters)
    else:
        mask = iterative_mask_node(spec, init, densities, filters)
    start = init
    if spec.prune.init_after_mask == "isometry":
        start = Node("isometry", "isometry", {"steps": ISOMETRY_STEPS, "lr": ISOMETRY_LR}, {"weights": init, "mask": mask})
    trained = train_node(spec, "sparse_train", start, spec.train, mask=mask)
    return Plan("prune_at_init", [dense, Round(1, spec.prune.criterion, densities[-1], mask, trained,
                                                evaluate_node(spec, trained, mask, physical=spec.prune.physical))])


def label(spec: PruneAtInitSpec, rnd: Round) -> str:
    p = spec.prune
    extra = [s for s in (p.schedule != "one_shot" and p.schedule, scope_tag(p),
                         p.init_after_mask == "isometry" and "isometry", p.tag()) if s]
    return pretty(p.criterion) + nm_tag(p) + (f" ({', '.join(extra)})" if extra else "")


PARADIGM = register_paradigm("prune_at_init", PruneAtInitSpec, plan, label,
                             "PaI: a mask from the init's scores (SNIP, GraSP, SynFlow, FORCE, ...), then train from scratch",
                             __doc__)
