"""The stage registry and the caching contract, usable from a notebook with no Prefect.

A stage is registered once, `@stage(name, salt=..., info=...)`: its function (node fields +
upstream refs -> payload, typed info), the code-version salt that enters its key, and the
info type its artifacts carry. Keys, the Prefect tasks and the store all read this one
table, so there is no second list of stage names to keep in step.

`run` is the whole caching contract: return the verified stored artifact if there is one,
otherwise compute, store atomically, and return it.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pai_core import distributed
from pai_core.infos import Info
from pai_core.progress import Progress, get_progress
from pai_core.store import Ref, Store

if TYPE_CHECKING:
    from pai_core.plan import Node

log = logging.getLogger("pai_core.stages")


@dataclass
class Runtime:
    """What a stage may use that is not part of its key: where to store, where to run,
    who watches (a progress display), which flow run asked."""
    store: Store
    device: str = "auto"
    computed: list[str] = field(default_factory=list)  # "stage/key" of each computation, in order
    progress: Progress | None = None  # None: the process default (the CLI's bars, or nothing)
    flow_run_id: str | None = None

    @property
    def torch_device(self) -> torch.device:
        from pai_core.determinism import resolve_device

        return resolve_device(self.device)

    @property
    def watcher(self) -> Progress:
        return self.progress or get_progress()


StageFn = Callable[["Node", Mapping[str, Ref], Runtime], tuple[dict, Info]]


@dataclass(frozen=True)
class StageDef:
    name: str
    salt: int
    fn: StageFn
    info: type[Info]
    description: str


_STAGES: dict[str, StageDef] = {}


def stage(name: str, *, salt: int, info: type[Info]) -> Callable[[StageFn], StageFn]:
    """Register a stage. Bump `salt` when its code changes what it computes: every key
    downstream changes with it, because upstream keys are inputs."""
    def deco(fn: StageFn) -> StageFn:
        if name in _STAGES:
            raise ValueError(f"stage {name!r} registered twice")
        doc = (fn.__doc__ or name).strip().splitlines()[0]
        _STAGES[name] = StageDef(name, salt, fn, info, doc)
        return fn
    return deco


def _loaded() -> dict[str, StageDef]:
    import pai_core.stages  # noqa: F401  (registers every stage on first use)

    return _STAGES


def get_stage(name: str) -> StageDef:
    stages = _loaded()
    if name not in stages:
        raise ValueError(f"unknown stage {name!r}; allowed: {', '.join(stages)}")
    return stages[name]


def stage_names() -> list[str]:
    return list(_loaded())


def run(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> Ref:
    """The stored artifact for `node`, computing it only if it is absent or corrupt. In a torchrun
    launch of several processes, rank 0 alone looks and writes (pai_core.distributed.run_stage)."""
    if distributed.world() > 1:
        return distributed.run_stage(node, inputs, rt)
    hit = rt.store.get(node.stage, node.key)
    if hit is not None:
        log.info("%s %s: reused", node.role, node.key)
        return hit
    rt.store.check_writable(node.stage)  # a read-only store fails here, in one line, before any compute
    log.info("%s %s: computing", node.role, node.key)
    payload, info = compute(node, inputs, rt)
    return store_result(node, inputs, rt, payload, info)


def compute(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, Info]:
    """The stage's payload and info with its provenance; stores nothing."""
    start = time.perf_counter()
    payload, info = get_stage(node.stage).fn(node, inputs, rt)
    info.seconds = round(time.perf_counter() - start, 3)  # provenance, not part of the key
    info.computed_by = {"host": socket.gethostname(), "pid": os.getpid(), "threads": torch.get_num_threads()}
    info.flow_run_id = rt.flow_run_id
    return payload, info


def store_result(node: Node, inputs: Mapping[str, Ref], rt: Runtime, payload: dict, info: Info) -> Ref:
    rt.computed.append(f"{node.stage}/{node.key}")
    provenance = {"role": node.role, "fields": node.fields, "inputs": {k: r.key for k, r in inputs.items()}}
    return rt.store.put(node.stage, node.key, payload, info, provenance)


def run_plan(nodes: list[Node], rt: Runtime) -> dict[str, Ref]:
    """Execute nodes in order with no orchestrator (notebooks, tests): key -> ref."""
    refs: dict[str, Ref] = {}
    for node in nodes:
        refs[node.key] = run(node, {k: refs[n.key] for k, n in node.inputs.items()}, rt)
    return refs
