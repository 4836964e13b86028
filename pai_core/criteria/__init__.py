"""Pruning criteria. Adding one: a file here and an import line below."""
from pai_core.criteria.registry import Criterion, criterion_names, get_criterion, register

from pai_core.criteria import magnitude, random  # noqa: E402,F401  (registration)

__all__ = ["Criterion", "criterion_names", "get_criterion", "register"]
