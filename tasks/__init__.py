"""Prefect tasks: one per stage role, each a thin wrapper over `pai_core.stages.run`."""
from tasks.stages import TASKS, run_stage_task

__all__ = ["TASKS", "run_stage_task"]
