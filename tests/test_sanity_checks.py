"""Sanity-check branches: each control changes exactly one thing about the mask or init."""
from __future__ import annotations

import torch

from conftest import tiny_spec
from pai_core.plan import build_plan
from pai_core.selection import select
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store


def test_branches_from_an_lth_mask(tmp_path):
    lth = tiny_spec(prune={"reinit_control": True})
    lth_plan = build_plan(lth)
    rt = Runtime(Store(tmp_path), "cpu")
    run_plan(lth_plan.nodes, rt)

    spec = tiny_spec(flow="sanity_checks", sanity={"base": "lottery_ticket"})
    plan = build_plan(spec)
    names = [r.name for r in plan.rounds]
    assert names == ["original", "reinit", "shuffle", "invert"]
    # The original and the reinit control are the LTH run's own round 2 stages.
    assert plan.rounds[0].evaluate.key == lth_plan.rounds[3].evaluate.key
    assert plan.rounds[1].evaluate.key == lth_plan.rounds[4].evaluate.key
    rt2 = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt2)
    assert {c.split("/")[0] for c in rt2.computed} == {"shuffle_mask", "mask", "train", "evaluate"}
    assert len(rt2.computed) == 1 + 1 + 2 + 2  # shuffle, inverted mask, two trainings, two evaluations

    load = lambda node: rt2.store.load(refs[node.key])["mask"]  # noqa: E731
    original, shuffled, inverted = load(plan.rounds[0].mask), load(plan.rounds[2].mask), load(plan.rounds[3].mask)
    for n in original:
        assert int(shuffled[n].sum()) == int(original[n].sum())  # same layer-wise density
        assert not torch.equal(shuffled[n], original[n])
    scores = rt2.store.load(refs[plan.rounds[0].mask.inputs["scores"].key])["scores"]
    previous = load(plan.rounds[0].mask.inputs["previous"])
    expected = select({n: -s for n, s in scores.items()}, previous, plan.rounds[0].density)
    assert all(torch.equal(inverted[n], expected[n]) for n in inverted)
    # Every branch trains with the original's schedule from the original's start, but reinit.
    t = plan.rounds[0].trained
    for r in plan.rounds[1:]:
        assert r.trained.fields == t.fields
    assert plan.rounds[2].trained.inputs["start"] is t.inputs["start"]
    assert plan.rounds[1].trained.inputs["start"].key != t.inputs["start"].key
