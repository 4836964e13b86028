"""Prefect flows, one per paradigm, over the shared stage tasks; plus sweep and report.

Importing the package applies pai-flow's environment defaults and nothing heavier: the
flows themselves (and so Prefect) load on first use of `FLOWS`, which keeps `pai server
status` and `pai validate` fast.
"""
from __future__ import annotations

from typing import Any

from flows.env import apply_defaults

apply_defaults()

PARADIGMS = ("lottery_ticket", "prune_after_training", "prune_at_init", "sanity_checks", "dynamic_sparse",
             "supermask")


def __getattr__(name: str) -> Any:
    if name == "FLOWS":
        import importlib

        return {p: getattr(importlib.import_module(f"flows.{p}"), p) for p in PARADIGMS}
    raise AttributeError(name)
