"""`structure: filter` for every paradigm whose masks are ranked (PaT, LTH, PaI): whole
filters/neurons with every channel tied to them (pai_core/channel_graph.py). One place holds
its fields, their checks, the mask-node fields it adds and the label tag, so a structured
lottery ticket, a structured mask at init and a structured PaT round mean the same thing.

With filters, LTH asks whether structured winning tickets exist (Liu et al. 2019 found that,
at CIFAR learning rates, they do not beat a random init) and PaI scores channels at init
(SNIP's |g ⊙ w| summed over a filter, as channel-level SNIP variants do).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pai_core.specs import STRUCTURES as SHARED_STRUCTURES
from pai_core.specs import PruneSpec

STRUCTURES = {**SHARED_STRUCTURES, "filter": "whole filters/neurons with every channel tied to them: the inputs "
                                             "they feed, and residual adds"}
# Criteria that score whole units (one score spread over a unit's weights): filter structure
# only, filter_norm max, and the layers they prune by default.
UNIT_CRITERIA = {"bn_scale": "batch_norm", "hrank": "all", "taylor_filter": "all"}


class FilterPrune(PruneSpec):
    """A prune section that may select whole filters (structure filter)."""
    SELECTS_FILTERS = True
    structure: Literal["unstructured", "nm", "filter"] = Field(
        "unstructured", description="what is pruned: " + "; ".join(f"{k}: {v}" for k, v in STRUCTURES.items()))
    filter_norm: Literal["l1", "l2", "max"] | None = Field(
        None, description="structure filter: how a filter's per-weight scores combine into one: l1 or l2 norm, or "
                          "max; None = max for criteria that score whole units (bn_scale, hrank, taylor_filter), "
                          "else l1")
    filter_layers: Literal["all", "batch_norm", "unshared"] | None = Field(
        None, description="structure filter: the channels that may go: all (every layer's but the output's), "
                          "batch_norm (those BatchNorms follow: network slimming's channels) or unshared (those "
                          "one layer makes alone: Li et al.'s ResNets keep the residual stream); None = batch_norm "
                          "for bn_scale, else all")
    physical: bool = Field(False, description="structure filter: also build and evaluate the smaller dense net")

    @model_validator(mode="after")
    def _filter_options(self) -> FilterPrune:
        if self.physical and self.structure != "filter":
            raise ValueError("prune.physical: the smaller net exists only for structure filter; allowed: false")
        if self.structure != "filter":
            for field in ("filter_norm", "filter_layers"):
                if getattr(self, field) is not None:
                    raise ValueError(f"prune.{field}: only structure filter uses it (this one is {self.structure})")
            if self.criterion in UNIT_CRITERIA:
                raise ValueError(f"prune.structure: {self.criterion} scores whole filters/neurons; allowed: filter")
            return self
        if self.scope not in ("layerwise", "global"):
            raise ValueError(f"prune.scope: structure filter ranks the filters of each layer (layerwise) or of all "
                             f"layers together (global); allowed: layerwise, global (got {self.scope})")
        if self.criterion in UNIT_CRITERIA and self.filter_norm not in (None, "max"):
            raise ValueError(f"prune.filter_norm: {self.criterion} gives every weight of a unit the unit's score, so "
                             f"a norm would weight it by the filter's size; allowed: max (or unset)")
        if self.criterion == "bn_scale" and self.filter_layers not in (None, "batch_norm"):
            raise ValueError("prune.filter_layers: bn_scale scores the channels a BatchNorm follows; allowed: "
                             "batch_norm (or unset)")
        return self

    @property
    def norm(self) -> str:
        """filter_norm as used: max for criteria that score whole units, l1 otherwise."""
        return self.filter_norm or ("max" if self.criterion in UNIT_CRITERIA else "l1")

    @property
    def unit_layers(self) -> str:
        """filter_layers as used: the criterion's own (batch_norm for bn_scale), else all."""
        return self.filter_layers or UNIT_CRITERIA.get(self.criterion, "all")

    def mask_fields(self) -> dict[str, Any] | None:
        """The mask node's extra fields of a filter selection; None when unstructured (its key is
        then the one it always had). A default filter_layers adds nothing, so earlier filter masks
        keep their keys."""
        if self.structure != "filter":
            return None
        fields: dict[str, Any] = {"structure": "filter", "filter_norm": self.norm}
        fields |= {"filter_layers": self.unit_layers} if self.unit_layers != "all" else {}
        fields |= {"ignore": self.ignore} if self.ignore else {}  # the filters of these layers stay
        return fields

    def filter_units(self, spec: Any) -> list[tuple[str, int]]:
        """(family, groups) that structure filter prunes in `spec`'s net (channel_graph); refused
        by field when the net's channels cannot be grouped or none may go. Called while the spec
        validates (ExperimentBase.pruned_units), on the meta-device net."""
        from pai_core import channel_graph, structured
        from pai_core.models import model_info, model_names
        from pai_core.prune_checks import meta_model

        name = spec.model.name
        if self.unit_layers == "batch_norm" and not model_info(name).has_batch_norm(spec.model.params):
            field = "criterion" if self.filter_layers is None else "filter_layers"
            what = "bn_scale ranks BatchNorm scales" if field == "criterion" else "batch_norm prunes BN channels"
            with_bn = [m if model_info(m).batch_norm is True else f"{m} with {model_info(m).batch_norm}: true"
                       for m in model_names() if model_info(m).batch_norm]
            raise ValueError(f"prune.{field}: {what}, and this {name} has no BatchNorm; allowed: a "
                             f"model with BatchNorm ({', '.join(with_bn)})")
        try:
            units = structured.unit_layers(meta_model(spec), self.unit_layers, self.ignore)
        except channel_graph.ChannelGraphError as e:
            raise ValueError(f"prune.structure: filter needs the channel groups of {name}: {e}; "
                             f"allowed: unstructured, nm") from e
        if not units:
            field = "filter_layers" if self.filter_layers is not None else "structure"
            raise ValueError(f"prune.{field}: {name} has no channel group that {self.unit_layers} filter "
                             "pruning may remove")
        return units

    def tag(self) -> str:
        """`filter` (with its candidate channels when not the criterion's default) for labels."""
        if self.structure != "filter":
            return ""
        return " ".join(filter(None, ("filter", self.unit_layers if self.unit_layers != UNIT_CRITERIA.get(
            self.criterion, "all") else "")))
