"""Prefect tasks generated from the stage registry: one per role a plan gives a node, so the
Prefect UI shows pretrain, rewind, retrain... each cached on its stage key. No role table:
any role of any registered paradigm gets its task on first use.

Tasks take the plan node and the upstream refs (key + sha256 + small typed info), never
tensors; results are the ref, which Prefect persists so a reused stage shows `Cached`.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.states import State

from pai_core.paths import pai_home
from pai_core.plan import Node
from pai_core.progress import Fanout, get_progress
from pai_core.stages import Runtime, get_stage, run
from pai_core.store import Ref, Store
from tasks.cache import STAGE_KEY, RefSerializer, record_is_safe


def default_store() -> Store:
    """One Store per root and process, so an artifact verified once is not re-hashed by
    the next call that looks at it (its cache is keyed on mtime and size)."""
    return _store_at(pai_home() / "store")


@lru_cache(maxsize=8)
def _store_at(root: Path) -> Store:
    return Store(root)


def _stage(node: Node, inputs: dict[str, Ref], label: str, device: str, live: Any = None) -> Ref:
    """`live` (a flows.live.LiveRound): this stage trains a round's weights, whose MLflow run
    it opens and feeds epoch by epoch."""
    from prefect import get_run_logger
    from prefect.runtime import flow_run

    from flows.live import LiveTraining

    watch = Fanout(get_progress(), LiveTraining(label, live, get_run_logger()))
    return run(node, inputs, Runtime(default_store(), device, progress=watch, flow_run_id=flow_run.get_id()))


@lru_cache(maxsize=None)
def task_for(role: str) -> Task:
    """The task named `role` (pretrain, retrain, reinit, ...), made once per process."""
    return task(_stage, name=role, cache_policy=STAGE_KEY, persist_result=True, result_serializer=RefSerializer(),
                task_run_name="{label}")


def run_stage_task(node: Node, inputs: dict[str, Ref], label: str, device: str, live: Any = None,
                   wait_for: list[State] | None = None) -> tuple[Ref, State]:
    """Run the node's task; returns (ref, its final Prefect state: named Cached or Completed).

    The task run is named "<label> (reused)" when the store holds the artifact, so reused and
    computed stages differ at a glance in the UI (a reused one also gets a note naming its key
    and producer, flows.results); `wait_for` (the upstream task states) draws the graph's edges
    even when every stage is cached.

    Prefect's cache record only says the stage ran once; the artifact store says whether
    its output still exists and is intact. If it does not, the task is forced to run
    (refresh_cache) so a deleted or corrupt artifact is recomputed, never trusted.
    """
    get_stage(node.stage)  # an unknown stage fails here, by name, before Prefect is involved
    current = default_store().get(node.stage, node.key)
    t = task_for(node.role)  # no per-key tags: Prefect checks tag concurrency limits per tag, ~1-2 s a task
    if current is None or not record_is_safe(node):
        t = t.with_options(refresh_cache=True)
    shown = label if current is None else f"{label} (reused)"
    state: State = t(node, inputs, shown, device, live, return_state=True, wait_for=wait_for or None)
    ref = Ref.model_validate(state.result())
    # A cache record can predate a recompute done outside Prefect (a notebook): when the
    # store holds the artifact, its own verified metadata is what the flow goes on with.
    return (current or ref), state

