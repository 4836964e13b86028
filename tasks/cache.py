"""Cache tasks on the stage key, not on Prefect's default (which includes the run id and
so never reuses across runs, and cannot hash tensors stably across processes anyway)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext


@dataclass
class StageKeyPolicy(CachePolicy):
    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        node = inputs["node"]
        return f"pai-{node.stage}-{node.key}"


STAGE_KEY = StageKeyPolicy()
