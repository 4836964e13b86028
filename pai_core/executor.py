"""The one executor: plans in, artifacts out. A single spec is a sweep of one.

It deduplicates every stage the plans need by key, reuses what the verified store holds,
hands the rest to a runner (in this process, Prefect tasks, Dask), and as stages finish
tells its hooks which rounds are complete, in each plan's order, so tracking, resume and
reporting are written once. A failing stage fails the rounds that need it, never the rest.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pai_core.plan import Node, Plan, Round
from pai_core.stages.registry import Runtime, run
from pai_core.store import Ref, Store

log = logging.getLogger("pai_core.executor")


@dataclass(frozen=True)
class Job:
    spec: Any   # a registered paradigm's spec
    plan: Plan


@dataclass(frozen=True)
class Work:
    """One stage to run, with what the runner needs besides the node."""
    node: Node
    label: str   # what the UI calls it: "retrain · round 2", "mask · snip[sparsity=0.9]"
    device: str
    live: Any = None  # from Hooks.live: where this stage's training reports as it goes


Done = Callable[[Work, Ref | None, BaseException | None, str], None]  # (work, ref, error, state)


class Runner(Protocol):
    """Runs work items, upstream before downstream, reporting each as it ends. `submit_stored`:
    also run stages the store holds (a Prefect runner does, so its UI shows them Cached)."""
    submit_stored: bool

    def run(self, work: Sequence[Work], refs: dict[str, Ref], done: Done) -> None: ...


class InOrder:
    """Runs work items one by one in this process; what needs a failed stage fails with it.
    Subclasses say how one stage runs (`run_one`)."""
    submit_stored = False

    def run_one(self, w: Work, inputs: dict[str, Ref]) -> tuple[Ref, str]:
        raise NotImplementedError

    def run(self, work: Sequence[Work], refs: dict[str, Ref], done: Done) -> None:
        failed: set[str] = set()
        for w in work:
            if bad := [n.key for n in w.node.inputs.values() if n.key in failed]:
                failed.add(w.node.key)
                done(w, None, RuntimeError(f"upstream stage {bad[0]} failed"), "Failed")
                continue
            try:
                ref, state = self.run_one(w, {k: refs[n.key] for k, n in w.node.inputs.items()})
            except Exception as e:  # noqa: BLE001 - reported; what does not need it goes on
                failed.add(w.node.key)
                done(w, None, e, "Failed")
                continue
            refs[w.node.key] = ref
            done(w, ref, None, state)


class InProcess(InOrder):
    """No orchestrator: `pai_core.stages.run` in order (notebooks, tests)."""

    def __init__(self, store: Store):
        self.store = store

    def run_one(self, w: Work, inputs: dict[str, Ref]) -> tuple[Ref, str]:
        return run(w.node, inputs, Runtime(self.store, w.device)), "Completed"


class Hooks:
    """What the flows layer does as results arrive (MLflow tracking, logs). No-ops here."""

    def round_done(self, job: Job, rnd: Round, refs: dict[str, Ref], reused: bool) -> None: ...
    def job_done(self, job: Job, refs: dict[str, Ref], failed: str | None) -> None: ...

    def live(self, job: Job, rnd: Round, node: Node) -> Any:
        """What the runner hands the stage so its training reports live (None: nothing)."""
        return None


@dataclass
class Outcome:
    refs: dict[str, Ref] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)  # stage key -> what failed it
    stages: list[dict[str, Any]] = field(default_factory=list)       # one row per stage that ran or was reused
    executed: Counter = field(default_factory=Counter)               # computed stages per role
    failed_jobs: dict[str, str] = field(default_factory=dict)        # spec name -> why

    @property
    def computed(self) -> int:
        return sum(s["status"] == "computed" for s in self.stages)

    @property
    def reused(self) -> int:
        return sum(s["status"] == "reused" for s in self.stages)


def execute(jobs: Sequence[Job], runner: Runner, store: Store, hooks: Hooks | None = None) -> Outcome:
    hooks = hooks or Hooks()
    out = Outcome()
    nodes: dict[str, Node] = {}
    where: dict[str, tuple[Job, Round]] = {}
    for job in jobs:
        for rnd, group in zip(job.plan.rounds, job.plan.nodes_by_round()):
            for n in group:
                nodes.setdefault(n.key, n)
                where.setdefault(n.key, (job, rnd))
    out.refs = {k: r for k, n in nodes.items() if (r := store.get(n.stage, n.key)) is not None}
    work = [Work(n, _label(n, *where[k], len(jobs)), where[k][0].spec.device,
                 None if k in out.refs else hooks.live(*where[k], n))
            for k, n in nodes.items() if runner.submit_stored or k not in out.refs]
    log.info("%d specs, %d stages in their plans, %d distinct; %d stored, %d to run",
             len(jobs), sum(len(j.plan.nodes) for j in jobs), len(nodes), len(out.refs),
             len(nodes) - len(out.refs))
    pending = {id(job): list(zip(job.plan.rounds, job.plan.nodes_by_round())) for job in jobs}
    status: dict[str, bool] = {k: True for k in out.refs}  # key -> reused?

    def advance() -> None:
        """Report every round now complete, in plan order; a round needing a failed stage fails its job."""
        for job in jobs:
            rounds = pending[id(job)]
            while rounds:
                rnd, group = rounds[0]
                need = _ancestors(rnd.evaluate) | (_ancestors(rnd.analysis) if rnd.analysis else set())
                if lost := [k for k in need if k in out.errors]:
                    err = out.errors[lost[0]]
                    out.failed_jobs[job.spec.name] = f"{nodes[lost[0]].role}: {type(err).__name__}: {err}"
                    rounds.clear()
                    hooks.job_done(job, out.refs, out.failed_jobs[job.spec.name])
                    break
                if not all(k in out.refs for k in need):
                    break
                rounds.pop(0)
                hooks.round_done(job, rnd, out.refs, all(status.get(n.key, True) for n in group))
                if not rounds:
                    hooks.job_done(job, out.refs, None)

    def done(w: Work, ref: Ref | None, error: BaseException | None, state: str) -> None:
        n = w.node
        if error is not None:
            out.errors[n.key] = error
            log.error("%s failed: %s: %s", w.label, type(error).__name__, error)
        else:
            reused = state == "Cached" or not ref.computed  # Completed without computing: another store's record
            status[n.key] = reused
            out.refs[n.key] = ref
            if not reused:
                out.executed[n.role] += 1
            out.stages.append({"stage": n.stage, "role": n.role, "round": where[n.key][1].name, "key": n.key,
                               "status": "reused" if reused else "computed", "prefect_state": state,
                               "seconds": 0.0 if reused else (ref.info.seconds or 0.0)})
        advance()

    advance()  # rounds wholly in the store
    if work:
        runner.run(work, out.refs, done)
    for k in nodes:
        if k not in out.refs and k not in out.errors:  # a runner that stopped early
            out.errors[k] = RuntimeError("not run")
    advance()
    return out


def _ancestors(node: Node) -> set[str]:
    seen: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n.key not in seen:
            seen.add(n.key)
            stack.extend(n.inputs.values())
    return seen


def _label(node: Node, job: Job, rnd: Round, n_jobs: int) -> str:
    if n_jobs > 1:
        return f"{node.role} · {job.spec.name}"
    return f"{node.role} · {rnd.name}" if rnd.index else node.role


def run_specs(specs: Sequence[Any], store: Store, hooks: Hooks | None = None) -> Outcome:
    """Every spec's plan in this process, shared stages once: the notebook entry point."""
    from pai_core.paradigms import build_plan

    return execute([Job(s, build_plan(s)) for s in specs], InProcess(store), store, hooks)
