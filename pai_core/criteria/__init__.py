"""Pruning criteria. Adding one: a file here and an import line below."""
from pai_core.criteria.registry import Criterion, ScoreInputs, criterion_names, get_criterion, register

from pai_core.criteria import force, grasp, magnitude, obd, prospr, random, snip, synflow, taylor  # noqa: E402,F401  (registration)
from pai_core.criteria import lamp, ntk_sap, phew  # noqa: E402,F401  (registration)
from pai_core.criteria import bn_scale, hrank, taylor_filter  # noqa: E402,F401  (registration)

__all__ = ["Criterion", "ScoreInputs", "criterion_names", "get_criterion", "register"]
