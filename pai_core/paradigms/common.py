"""Labels and rules more than one paradigm uses."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pai_core.specs import TrainSpec

REWIND_OPTIMIZER = Literal["restore", "fresh"]


def rewind_optimizer_field() -> object:
    """The rewinding option LTH and the instability analysis share (a pydantic Field)."""
    return Field("restore", description="at a rewind point k > 0: restore = the optimizer state saved at k "
                                        "(momentum) as well as the weights, schedule and data order; fresh = a "
                                        "new optimizer at step k (open_lth's lottery runner). Same at k = 0")

PRETTY = dict(snip="SNIP", grasp="GraSP", synflow="SynFlow", set="SET", rigl="RigL", edge_popup="edge-popup", obd="OBD",
              taylor="Taylor", force="FORCE", prospr="ProsPr", granet="GraNet", mest="MEST",
              topkast="Top-KAST", phew="PHEW", ntk_sap="NTK-SAP", lamp="LAMP", hrank="HRank")


def pretty(name: str) -> str:
    return PRETTY.get(name, name)


def nm_tag(prune: object) -> str:
    """`" 2:4"` for an N:M mask (prune.structure nm; `" 2:4 by channel"` with nm_groups channels),
    else "": the report's labels tell them apart."""
    if getattr(prune, "structure", None) != "nm":
        return ""
    return f" {prune.n}:{prune.m}" + (" by channel" if getattr(prune, "nm_groups", "rows") == "channels" else "")


SCOPE_TAGS = {"global": "", "smart_ratio": "smart ratio", "uniform_plus": "uniform+"}


def scope_tag(prune: object) -> str:
    """The layer allocation for a label when it is not one global ranking ("erk", "layerwise",
    "smart ratio", "uniform+"); "" for filter selections, whose scope their tag does not show."""
    scope = getattr(prune, "scope", "global")
    if getattr(prune, "structure", None) == "filter":
        return ""
    return SCOPE_TAGS.get(scope, scope)


def rewind_fits(rewind_iter: int, total: int, field: str = "prune.rewind_iter") -> None:
    if rewind_iter >= total:
        raise ValueError(f"{field}: must be < the {total} training iterations")


def rewind_state(choice: str, k: int) -> str | None:
    """The train node's `optimizer_state` for a training from w_k: "fresh" when asked and k > 0;
    at k = 0 there is no state to restore, so both choices are one training (one key)."""
    return "fresh" if choice == "fresh" and k > 0 else None


def same_optimizer(train: TrainSpec, retrain: TrainSpec | None, why: str) -> None:
    if retrain is not None and retrain.optimizer != train.optimizer:
        raise ValueError(f"{why}; retrain.optimizer must equal train.optimizer")
