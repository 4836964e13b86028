"""Dynamic sparse training. k1 = 0, then the mask is updated while training by the method
`dynamic.method` names (pai_core/dynamic_methods: SET, RigL, DeepR, DSR, SNFS, GraNet, MEST,
Top-KAST, SR-STE). SET/RigL:
every `update_interval` iterations each layer drops its smallest weights and regrows as
many, at random (SET) or by dense-gradient magnitude (RigL); the later methods take their
options in `dynamic.params`. The initial mask is prune.criterion (random) with prune.scope
(ERK), at the final density or, for a method whose density moves (GraNet), at its
`initial_density`; evaluation uses the final mask. `prune.structure: nm` is for a method that
keeps N:M groups (SR-STE, which re-chooses them from its dense weights every step); every other
method moves single weights anywhere in a layer and refuses it.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from pai_core.callbacks import register_callback
from pai_core.dynamic import DynamicSparsity
from pai_core.dynamic_methods import dynamic_method_names, get_method
from pai_core.dynamic_methods.tools import InTimeOverparam
from pai_core.form_schema import registry_enum
from pai_core.paradigms.common import nm_tag
from pai_core.paradigms.registry import register_paradigm
from pai_core.plan import Plan, Round, dense_round, evaluate_node, mask_node, score_node, train_node
from pai_core.specs import ExperimentBase, Frozen, PruneSpec, registered, schedule_help
from pai_core.training import Callback
from pai_core.yaml_io import clip, dotted

# The options SET and RigL read (their stage keys are these, resolved); later methods refuse them.
SET_RIGL_OPTIONS = ("update_interval", "drop_fraction", "end_fraction", "anneal", "grow_init", "regrow_dropped",
                    "skip_step_on_update")


class DynamicSpec(Frozen):
    """How the mask moves while training."""
    method: str = Field(description="a registered dynamic sparse method (pai list): set, rigl, deepr, dsr, snfs, "
                                    "granet, mest, topkast, sr_ste",
                        json_schema_extra=registry_enum(dynamic_method_names))
    update_interval: int = Field(100, gt=0, description="set/rigl: iterations between mask updates")
    drop_fraction: float = Field(0.3, gt=0, lt=1, description="set/rigl: fraction of each layer's active weights "
                                                                 "moved (at the first update, when annealed)")
    end_fraction: float = Field(0.75, gt=0, le=1, description="set/rigl: no updates after this fraction of training")
    anneal: Literal["cosine", "constant"] | None = Field(
        None, description="set/rigl: drop fraction over time; None = the paper's (RigL: cosine, SET: constant)")
    grow_init: Literal["zero", "random"] | None = Field(
        None, description="set/rigl: value of a new connection; None = the paper's (RigL: zero, SET: random)")
    regrow_dropped: bool = Field(True, description="set/rigl: a weight dropped in an update may be regrown in it "
                                                   "(both references); false: grow only among the inactive")
    skip_step_on_update: bool | None = Field(
        None, description="set/rigl: no optimizer step on update iterations; None = the reference's (RigL: yes, "
                          "SET: no)")
    params: dict[str, Any] = Field(default_factory=dict, description="deepr, dsr, snfs, granet, mest, topkast, "
                                                                     "sr_ste: the method's own options (pai list "
                                                                     "names them); empty = the paper's")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        return registered(v, dynamic_method_names(), "dynamic method")

    @model_validator(mode="after")
    def _options(self) -> DynamicSpec:
        """SET/RigL read the fields above and have no params; every other method reads only
        its params, validated against its own model, and refuses a SET/RigL field by name."""
        method = get_method(self.method)
        if method.top_level:
            if self.params:
                raise ValueError(f"params.{dotted([next(iter(self.params))])}: unknown field; allowed: none "
                                 f"({self.method} takes its options as dynamic.{', dynamic.'.join(SET_RIGL_OPTIONS)})")
            return self
        own = ", ".join(method.Params.model_fields)
        stray = [f for f in SET_RIGL_OPTIONS  # at its default it changes nothing (a form sends every field)
                 if getattr(self, f) != type(self).model_fields[f].get_default(call_default_factory=True)]
        if stray:
            raise ValueError(f"{stray[0]}: a set/rigl option; {self.method} takes its options in dynamic.params; "
                             f"allowed: {own}")
        try:
            method.Params.model_validate(self.params)
        except ValidationError as err:
            e = err.errors(include_url=False)[0]
            what = "unknown field" if e["type"] == "extra_forbidden" else f"{e['msg']} (got {clip(e.get('input'))})"
            raise ValueError(f"params.{dotted(e['loc'])}: {what}; allowed: {own}") from None
        return self

    def resolved(self) -> dict:
        """What the training runs, and its key. SET/RigL: every option with the method's paper
        default filled in (the key they always had); others: the method and its params, all
        of them, defaults filled in."""
        method = get_method(self.method)
        if not method.top_level:
            return {"method": self.method, "params": method.Params.model_validate(self.params).key_fields()}
        given = self.model_dump(mode="json", exclude={"params"})
        out = {k: (DynamicSparsity.paper_defaults(self.method).get(k) if v is None else v) for k, v in given.items()}
        if out["grow_init"] == "random":  # new keys: random growth once drew at the active weights' std (diverged)
            out["grow_std"] = "masked_layer"
        return out


NM_REFUSED = "dynamic_sparse cannot keep an N:M pattern with {method}: its mask updates drop and regrow weights " \
             "anywhere in a layer (dynamic.method {keepers} learns N:M masks)"


class OneShotPrune(PruneSpec):
    schedule: Literal["one_shot"] = Field("one_shot", description=schedule_help("one_shot"))


class DynamicSparseSpec(ExperimentBase):
    flow: Literal["dynamic_sparse"] = "dynamic_sparse"
    prune: OneShotPrune = Field(description="the initial mask at init (criterion random, scope erk in the papers)")
    dynamic: DynamicSpec = Field(description="how the mask moves during training (SET, RigL, DeepR, DSR, SNFS)")

    @model_validator(mode="before")
    @classmethod
    def _nm_needs_a_method_that_keeps_it(cls, data: Any) -> Any:
        """`prune.structure: nm` with a method whose updates move single weights is refused
        first, before the N:M rules of the prune section would ask for n, m or sparsity."""
        prune, dynamic = (data.get(k) if isinstance(data, dict) else None for k in ("prune", "dynamic"))
        structure = prune.get("structure") if isinstance(prune, dict) else getattr(prune, "structure", None)
        method = dynamic.get("method") if isinstance(dynamic, dict) else getattr(dynamic, "method", None)
        if structure == "nm" and method in dynamic_method_names() and not get_method(method).keeps_nm:
            keepers = " or ".join(n for n in dynamic_method_names() if get_method(n).keeps_nm)
            raise ValueError(f"prune.structure: {NM_REFUSED.format(method=method, keepers=keepers)}; "
                             f"allowed: unstructured")
        return data

    @model_validator(mode="after")
    def _updates_happen(self) -> DynamicSparseSpec:
        """At least one mask update before the method stops: none at all would train the
        initial mask statically while the spec names a dynamic method."""
        method = get_method(self.dynamic.method)
        if not method.top_level:
            problem = method.Params.model_validate(self.dynamic.params).schedule_problem(
                self.total_iterations, self.data.iterations_per_epoch)
            if problem:
                raise ValueError(f"dynamic.{problem}")
            start, final = start_density(self.dynamic), self.prune.round_densities()[-1]
            if start is not None and start < final:
                raise ValueError(f"dynamic.params.initial_density: {start:g} is below the final density {final:g} "
                                 f"(1 - prune.sparsity), and pruning only removes weights; allowed: {final:g} to 1")
            return self
        end = int(self.dynamic.end_fraction * self.total_iterations)
        if self.dynamic.update_interval >= end:
            raise ValueError(f"dynamic.update_interval: no mask update would happen: updates stop at iteration {end:,} "
                             f"(end_fraction {self.dynamic.end_fraction:g} of {self.total_iterations:,}); "
                             f"allowed: below {max(end, 1):,}")
        return self


def start_density(dynamic: DynamicSpec) -> float | None:
    """A method whose density changes while training (GraNet's gradual pruning) names the
    density it starts from in its params, `initial_density`; every other method starts and
    stays at the final density (None), and its keys are unchanged."""
    method = get_method(dynamic.method)
    return None if method.top_level else getattr(method.Params.model_validate(dynamic.params), "initial_density", None)


@register_callback("dynamic")
def _dynamic(d: dict, total: int, key: str) -> Callback:
    """The method's callback, its random draws seeded from the train node's key, inside the
    in-time over-parameterization tracker (R_s, an output: no key changes)."""
    return InTimeOverparam(get_method(d["method"]).build(d, total, int(key[:12], 16)))


def plan(spec: DynamicSparseSpec) -> Plan:
    init, dense = dense_round(spec)
    density = spec.prune.round_densities()[-1]
    dynamic, start = spec.dynamic.resolved(), start_density(spec.dynamic)
    if start is not None:  # its density moves (GraNet): it starts at its own, and the target enters its key
        dynamic["final_density"] = density
    if spec.prune.structure == "nm":  # a method that keeps N:M (SR-STE) chooses its masks in these groups
        groups = [spec.prune.nm_groups] if spec.prune.nm_groups != "rows" else []  # the default adds nothing
        dynamic["nm"] = [spec.prune.n, spec.prune.m, *groups]
    first = density if start is None else start
    start_mask = mask_node(spec, score_node(spec, init, None, density=first), None, first)
    trained = train_node(spec, "sparse_train", init, spec.train, mask=start_mask, dynamic=dynamic)
    return Plan("dynamic_sparse", [dense, Round(1, spec.dynamic.method, density, start_mask, trained,
                                                 evaluate_node(spec, trained, None))])


def label(spec: DynamicSparseSpec, rnd: Round) -> str:
    method = get_method(spec.dynamic.method)
    name = method.label if method.top_level else method.Params.model_validate(spec.dynamic.params).display_label(
        method.label)
    return name + nm_tag(spec.prune)


PARADIGM = register_paradigm("dynamic_sparse", DynamicSparseSpec, plan, label,
                             "sparse training with a moving mask: SET, RigL, DeepR, DSR, SNFS, GraNet, MEST, Top-KAST, "
                             "SR-STE (N:M) (pai list: dynamic methods)", __doc__)
