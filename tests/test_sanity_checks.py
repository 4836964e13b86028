"""Sanity-check branches: each control changes exactly one thing about the mask or init."""
from __future__ import annotations

import torch

from conftest import tiny_spec
from pai_core.paradigms import build_plan
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
    assert {c.split("/")[0] for c in rt2.computed} == {"shuffle_mask", "invert_mask", "train", "evaluate"}
    assert len(rt2.computed) == 1 + 1 + 2 + 2  # shuffle, inverted mask, two trainings, two evaluations

    load = lambda node: rt2.store.load(refs[node.key])["mask"]  # noqa: E731
    original, shuffled, inverted = load(plan.rounds[0].mask), load(plan.rounds[2].mask), load(plan.rounds[3].mask)
    for n in original:
        assert int(shuffled[n].sum()) == int(original[n].sum())  # same layer-wise density
        assert not torch.equal(shuffled[n], original[n])
    # The inverted ranking of the whole 2-round history, per layer at the original's counts,
    # computed here one weight at a time: (round it was pruned in, its score then), lowest kept.
    m2 = plan.rounds[0].mask
    m1 = m2.inputs["previous"]
    masks = [load(m1), load(m2)]
    scores = [rt2.store.load(refs[m.inputs["scores"].key])["scores"] for m in (m1, m2)]
    for n in original:
        ranked = []
        for i in range(original[n].numel()):
            alive, key = True, (3, float(scores[1][n].reshape(-1)[i]))
            for j, (m, s) in enumerate(zip(masks, scores), start=1):
                if alive and not bool(m[n].reshape(-1)[i]):
                    key, alive = (j, float(s[n].reshape(-1)[i])), False
            ranked.append((key, i))
        keep = {i for _, i in sorted(ranked)[:int(original[n].sum())]}
        expected = torch.tensor([i in keep for i in range(original[n].numel())]).reshape(original[n].shape)
        assert torch.equal(inverted[n], expected), n
        assert int(inverted[n].sum()) == int(original[n].sum())
        pruned_first = masks[0][n] == 0
        if int(original[n].sum()) <= int(pruned_first.sum()):  # the inverse lies inside round 1's pruned set
            assert bool((inverted[n] <= pruned_first).all())
    # Every branch trains with the original's schedule from the original's start, but reinit.
    t = plan.rounds[0].trained
    for r in plan.rounds[1:]:
        assert r.trained.fields == t.fields
    assert plan.rounds[2].trained.inputs["start"] is t.inputs["start"]
    assert plan.rounds[1].trained.inputs["start"].key != t.inputs["start"].key
