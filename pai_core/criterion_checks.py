"""What a criterion asks of the spec that uses it, checked while the spec validates: its own
params, the selection it needs (whole filters; a global, floor-free one for a criterion that picks
its own kept set), BatchNorm mode only where it runs the network in one, and the nets it can
score (asked of the meta-device net). Each raises ValueError naming the field, before any compute."""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from pai_core.criteria import criterion_names, get_criterion
from pai_core.yaml_io import clip, dotted


def check_prune(prune: Any) -> None:
    """`prune` (a PruneSpec) against its criterion's requirements."""
    crit = get_criterion(prune.criterion)
    try:  # reject unknown/ill-typed params now, named under params
        crit.Params.model_validate(prune.params)
    except ValidationError as err:
        e = err.errors(include_url=False)[0]
        allowed = ", ".join(crit.Params.model_fields) or f"none ({prune.criterion} has no params)"
        what = "unknown field" if e["type"] == "extra_forbidden" else f"{e['msg']} (got {clip(e.get('input'))})"
        raise ValueError(f"params.{dotted(e['loc'])}: {what}; allowed: {allowed}") from None
    if crit.whole_units and not prune.SELECTS_FILTERS:
        allowed = ", ".join(n for n in criterion_names() if not get_criterion(n).whole_units)
        raise ValueError(f"criterion: {prune.criterion} scores whole filters/neurons, which only "
                         f"structure: filter removes (prune_after_training, lottery_ticket, prune_at_init); "
                         f"allowed here: {allowed}")
    if crit.chooses_count:  # its scores rank its own set first: only this selection keeps exactly that set
        why = f"criterion {prune.criterion} chooses the kept weights itself"
        for field, allowed in (("structure", "unstructured"), ("scope", "global"), ("min_density", 0.0),
                               ("prune_biases", False)):
            if getattr(prune, field) != allowed:
                raise ValueError(f"prune.{field}: {why}, which only a global selection of weights without floors "
                                 f"keeps; allowed: {str(allowed).lower()} (got {clip(getattr(prune, field))})")
    if prune.bn_mode is not None and crit.bn_mode is None:
        raise ValueError(f"bn_mode: criterion {prune.criterion} takes no BatchNorm mode (it does not run the "
                         f"network, or sets BatchNorm itself)")


def check_model(prune: Any, model_name: str, meta_model: Any) -> None:
    """The criterion's own refusal of a net (PHEW: depthwise convs); `meta_model()` builds it."""
    check = get_criterion(prune.criterion).model_check
    if check and (problem := check(meta_model())):
        raise ValueError(f"prune.criterion: {prune.criterion} cannot score {model_name}: {problem}")
