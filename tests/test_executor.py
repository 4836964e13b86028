"""The one executor: shared stages once, rounds reported in plan order as they complete, a
failing stage failing only what needs it, a finished set computing nothing."""
from __future__ import annotations

from conftest import tiny_spec
from pai_core.executor import Hooks, InProcess, Job, execute, run_specs
from pai_core.paradigms import build_plan
from pai_core.store import Store


class Record(Hooks):
    def __init__(self):
        self.rounds, self.jobs = [], []

    def round_done(self, job, rnd, refs, reused):
        assert refs[rnd.evaluate.key].info.test_acc >= 0
        self.rounds.append((job.spec.name, rnd.name, reused))

    def job_done(self, job, refs, failed):
        self.jobs.append((job.spec.name, failed))


def specs():
    pat = lambda s, name: tiny_spec("prune_after_training", name=name, prune={  # noqa: E731
        "schedule": "one_shot", "sparsity": s, "rate": None, "rounds": 1})
    collapse = tiny_spec("prune_at_init", name="collapse", prune={
        "criterion": "magnitude", "schedule": "one_shot", "sparsity": 0.9995, "rate": None, "rounds": 1})
    return [pat(0.5, "half"), pat(0.9, "tenth"), collapse]


def test_shared_stages_once_failures_alone_rounds_in_order(tmp_path):
    store = Store(tmp_path)
    hooks = Record()
    out = execute([Job(s, build_plan(s)) for s in specs()], InProcess(store), store, hooks)
    assert out.executed["init"] == 1 and out.executed["pretrain"] == 1, "init and pretrain shared by all three"
    assert out.executed["finetune"] == 2
    assert list(out.failed_jobs) == ["collapse"] and "LayerCollapse" in out.failed_jobs["collapse"]
    assert [r for r in hooks.rounds if r[0] == "half"] == [("half", "dense", False), ("half", "round 1", False)]
    # Every spec gets its (shared) dense round; the collapsing spec gets nothing after it.
    assert {(name, rnd) for name, rnd, _ in hooks.rounds} == {
        ("half", "dense"), ("half", "round 1"), ("tenth", "dense"), ("tenth", "round 1"), ("collapse", "dense")}
    assert hooks.rounds.index(("tenth", "dense", False)) < hooks.rounds.index(("half", "round 1", False))
    assert sorted(hooks.jobs) == [("collapse", out.failed_jobs["collapse"]), ("half", None), ("tenth", None)]

    again = Record()
    second = execute([Job(s, build_plan(s)) for s in specs()[:2]], InProcess(store), store, again)
    assert second.computed == 0 and not second.errors and not second.stages, "nothing submitted, nothing run"
    assert all(reused for *_, reused in again.rounds) and len(again.rounds) == 4


def test_run_specs_is_the_notebook_entry_point(tmp_path):
    out = run_specs([tiny_spec()], Store(tmp_path))
    plan = build_plan(tiny_spec())
    assert set(out.refs) == {n.key for n in plan.nodes} and not out.errors
