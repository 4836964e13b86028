"""Prefect tasks, generated per stage role over `pai_core.stages.run`."""
from tasks.stages import default_store, run_stage_task, task_for

__all__ = ["default_store", "run_stage_task", "task_for"]
