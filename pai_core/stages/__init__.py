"""The stages: node fields + upstream artifacts -> one stored artifact. One file per stage
(or per family of masks); each registers itself with `@stage(name, salt=..., info=...)`.
Adding a stage: a file here and an import line below."""
from pai_core.stages.registry import Runtime, StageDef, get_stage, run, run_plan, stage, stage_names

from pai_core.stages import init, train, score, mask, select, evaluate, isometry, interpolate  # noqa: E402,F401,I001  (registration order)

__all__ = ["Runtime", "StageDef", "get_stage", "run", "run_plan", "stage", "stage_names"]
