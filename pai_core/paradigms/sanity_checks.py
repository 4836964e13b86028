"""Sanity checks for pruning (Frankle et al. 2021; Su et al. 2020): one round's mask of a
base paradigm beside controls trained exactly as the original: a fresh random init under
the same mask (reinit), the mask shuffled within each layer (same layer-wise densities),
and the inverted mask. The base plan's nodes are the very nodes a standalone base run has,
so they are reused.

`invert` keeps, layer by layer at the original's per-layer counts, the weights the whole
pruning history ranked lowest (pruned earliest; within a round, lowest score then). For
iterative pruning at fixed weights (SynFlow's 100 rounds) it is the same schedule run on
negated scores, and for whole filters the inverted filter ranking.

For a pruned-after-training mask, `scratch_e` and `scratch_b` are Liu et al. (ICLR 2019)'s
baselines: the pruned net from a fresh init, trained for the pretraining's epochs (Scratch-E)
or for its FLOPs (Scratch-B, the schedule stretched by dense / pruned FLOPs, pai_core/budget.py).
`reinit` instead trains the fresh init with the fine-tune's schedule, which is no baseline for
PaT: too short. LTH and PaI masks are trained from an init already, so their `reinit` is
Scratch-E and the scratch checks are refused.
"""
from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from pai_core.criteria import get_criterion
from pai_core.paradigms.registry import get_paradigm, register_paradigm
from pai_core.plan import REINIT_SEED_OFFSET, Node, Plan, Round, evaluate_node, init_node, train_node
from pai_core.specs import ExperimentBase, Frozen, TrainSpec

BASES = ("lottery_ticket", "prune_after_training", "prune_at_init")


class SanitySpec(Frozen):
    base: Literal["lottery_ticket", "prune_after_training", "prune_at_init"] = Field(
        description="the paradigm whose mask is checked")
    round: int | None = Field(None, ge=1, description="which pruning round's mask; None = the last")
    checks: tuple[Literal["reinit", "shuffle", "invert", "scratch_e", "scratch_b"], ...] = Field(
        ("reinit", "shuffle", "invert"), description="reinit: fresh weights; shuffle: mask permuted per layer; "
                                                    "invert: the pruned weights kept instead; prune_after_training "
                                                    "only: scratch_e / scratch_b: fresh weights trained for the "
                                                    "pretraining's epochs / FLOPs (Liu et al. 2019)")
    budget_cap: float | None = Field(None, ge=1, le=100, description="scratch_b: at most this many times the "
                                     "pretraining's iterations (Liu et al.'s ImageNet runs: 2); None = no cap")


class SanityChecksSpec(ExperimentBase):
    flow: Literal["sanity_checks"] = "sanity_checks"
    retrain: TrainSpec | None = Field(None, description="as the base paradigm's retrain")
    prune: dict[str, Any] = Field(description="the base paradigm's prune section")
    sanity: SanitySpec = Field(description="which base paradigm's masks to check, and how")

    @model_validator(mode="after")
    def _base_is_valid(self) -> SanityChecksSpec:
        base = self.base_spec
        pruned = [r for r in get_paradigm(base.flow).plan(base).rounds if r.mask is not None]
        if self.sanity.round is not None and self.sanity.round > (n := len({r.index for r in pruned})):
            raise ValueError(f"sanity.round: beyond the base paradigm's pruning rounds; allowed: 1..{n}")
        scratch = [c for c in self.sanity.checks if c.startswith("scratch")]
        if scratch and self.sanity.base != "prune_after_training":
            raise ValueError(f"sanity.checks: {scratch[0]} trains a pruned-after-training mask from scratch; a "
                             f"{self.sanity.base} mask is trained from an init already (its reinit check is "
                             f"Scratch-E); allowed with this base: reinit, shuffle, invert")
        criterion = base.prune.criterion
        if "invert" in self.sanity.checks and get_criterion(criterion).chooses_count:
            raise ValueError(f"sanity.checks: invert keeps the lowest-ranked weights, and {criterion} ranks only "
                             f"the weights it chose (the rest tie at 0, so an inverse is just the lowest indices); "
                             f"allowed with this criterion: reinit, shuffle")
        if self.sanity.budget_cap is not None and "scratch_b" not in self.sanity.checks:
            raise ValueError("sanity.budget_cap: only the scratch_b check uses it")
        return self

    @cached_property
    def base_spec(self) -> ExperimentBase:
        """The base paradigm's own spec, validated as that paradigm validates it."""
        raw = self.model_dump(mode="json", exclude={"sanity", "flow"}, exclude_none=True)
        try:
            return get_paradigm(self.sanity.base).spec.model_validate(raw | {"flow": self.sanity.base})
        except ValidationError as err:
            e = err.errors(include_url=False)[0]
            loc = ".".join(map(str, e["loc"]))
            msg = e["msg"].removeprefix("Value error, ")
            head, sep, rest = msg.partition(": ")
            if loc and sep and head.replace(".", "_").isidentifier():  # the message names a deeper field itself
                loc, msg = (head if head.startswith(f"{loc}.") else f"{loc}.{head}"), rest
            raise ValueError(f"{loc + ': ' if loc else ''}{msg} (as a {self.sanity.base} spec)") from None

    def summary(self) -> str:
        return f"{self.base_spec.summary()} ({self.sanity.base} base)"


def plan(spec: SanityChecksSpec) -> Plan:
    base = get_paradigm(spec.sanity.base).plan(spec.base_spec)
    pruned = [r for r in base.rounds if r.mask is not None and not r.name.endswith("reinit")]
    orig = pruned[-1] if spec.sanity.round is None else pruned[spec.sanity.round - 1]
    t = orig.trained
    rounds = [Round(orig.index, "original", orig.density, orig.mask, t, orig.evaluate)]

    def branch(name: str, mask: Node, start: Node) -> None:
        if start.stage == "isometry":  # the base re-initialises for its mask: do so for this one
            start = Node("isometry", "isometry", start.fields, {**start.inputs, "mask": mask})
        trained = Node("train", name, t.fields, {"start": start, "mask": mask})
        rounds.append(Round(orig.index, name, orig.density, mask, trained, evaluate_node(spec, trained, mask)))

    for check in spec.sanity.checks:
        if check == "reinit":
            branch("reinit", orig.mask, init_node(spec, seed=spec.seed + REINIT_SEED_OFFSET))
        elif check == "shuffle":
            branch("shuffle", Node("shuffle_mask", "shuffle", {"seed": spec.seed}, {"mask": orig.mask}),
                   t.inputs["start"])
        elif check == "invert":
            branch("invert", inverted(orig.mask), t.inputs["start"])
        else:  # Liu et al. 2019: the pruned net from a fresh init, with the pretraining's schedule
            budget = {"budget": {"cap": spec.sanity.budget_cap}} if check == "scratch_b" else {}
            trained = train_node(spec, check, init_node(spec, seed=spec.seed + REINIT_SEED_OFFSET),
                                 spec.base_spec.train, mask=orig.mask, **budget)
            rounds.append(Round(orig.index, check, orig.density, orig.mask, trained,
                                evaluate_node(spec, trained, orig.mask)))
    return Plan("sanity_checks", rounds)


def inverted(mask: Node) -> Node:
    """The inverted mask of a pruning history: every round's mask and scores feed it."""
    if mask.stage != "mask" or mask.fields.get("structure"):  # fixed-weight rounds; filters
        # filters invert their ranked norms ("filters": a new key, as the old inversion of the
        # weights' scores did nothing under the norm's abs)
        how = "filters" if mask.fields.get("structure") == "filter" else True
        return Node(mask.stage, "invert", {**mask.fields, "invert": how}, mask.inputs)
    history: list[Node] = []
    node: Node | None = mask
    while node is not None:
        history.insert(0, node)
        node = node.inputs.get("previous")
    inputs = {f"mask_{j}": m for j, m in enumerate(history, start=1)}
    inputs |= {f"scores_{j}": m.inputs["scores"] for j, m in enumerate(history, start=1)}
    return Node("invert_mask", "invert", {"rounds": len(history)}, inputs)


def label(spec: SanityChecksSpec, rnd: Round) -> str:
    return rnd.name  # original / reinit / shuffle / invert


PARADIGM = register_paradigm("sanity_checks", SanityChecksSpec, plan, label,
                             "sanity checks on one round's mask: random reinit, layer-wise shuffle, inverted ranking",
                             __doc__)
