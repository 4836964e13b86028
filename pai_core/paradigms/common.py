"""Labels and rules more than one paradigm uses."""
from __future__ import annotations

from pai_core.specs import TrainSpec

PRETTY = dict(snip="SNIP", grasp="GraSP", synflow="SynFlow", set="SET", rigl="RigL", edge_popup="edge-popup", obd="OBD",
              taylor="Taylor", force="FORCE", prospr="ProsPr", granet="GraNet")


def pretty(name: str) -> str:
    return PRETTY.get(name, name)


def nm_tag(prune: object) -> str:
    """`" 2:4"` for an N:M mask (prune.structure nm), else "": the report's labels tell them apart."""
    return f" {prune.n}:{prune.m}" if getattr(prune, "structure", None) == "nm" else ""


def rewind_fits(rewind_iter: int, total: int, field: str = "prune.rewind_iter") -> None:
    if rewind_iter >= total:
        raise ValueError(f"{field}: must be < the {total} training iterations")


def same_optimizer(train: TrainSpec, retrain: TrainSpec | None, why: str) -> None:
    if retrain is not None and retrain.optimizer != train.optimizer:
        raise ValueError(f"{why}; retrain.optimizer must equal train.optimizer")
