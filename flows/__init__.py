"""Prefect flows, one per paradigm, over the shared stage tasks."""
from flows.env import apply_defaults

apply_defaults()

from flows.dynamic_sparse import dynamic_sparse  # noqa: E402
from flows.lottery_ticket import lottery_ticket  # noqa: E402
from flows.prune_after_training import prune_after_training  # noqa: E402
from flows.prune_at_init import prune_at_init  # noqa: E402
from flows.sanity_checks import sanity_checks  # noqa: E402
from flows.supermask import supermask  # noqa: E402

FLOWS = {"lottery_ticket": lottery_ticket, "prune_after_training": prune_after_training,
         "prune_at_init": prune_at_init, "sanity_checks": sanity_checks, "dynamic_sparse": dynamic_sparse,
         "supermask": supermask}

__all__ = ["FLOWS", "dynamic_sparse", "lottery_ticket", "prune_after_training", "prune_at_init", "sanity_checks", "supermask"]
