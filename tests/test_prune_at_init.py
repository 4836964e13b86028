"""Pruning at init: the mask comes from the init (once or over many rounds), then one
training from the same init under it."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_spec
from pai_core.paradigms import build_plan
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store

N_WEIGHTS = 256 * 300 + 300 * 100 + 100 * 10  # lenet_300_100 on 1×16×16 synthetic inputs


@pytest.mark.parametrize("criterion, schedule", [
    ("snip", {"schedule": "one_shot", "sparsity": 0.9, "rounds": 1}),
    ("synflow", {"schedule": "iterative", "sparsity": 0.9, "rounds": 10}),
    ("grasp", {"schedule": "iterative", "sparsity": 0.9, "rounds": 3}),
])
def test_mask_from_init_then_train_from_that_init(tmp_path, criterion, schedule):
    spec = tiny_spec("prune_at_init", prune={"criterion": criterion, "rate": None, **schedule})
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    rnd = plan.rounds[1]
    init = plan.rounds[0].trained.inputs["start"]
    assert rnd.trained.inputs["start"] is init, "the sparse net trains from the init itself"
    mask = rt.store.load(refs[rnd.mask.key])["mask"]
    assert sum(int(m.sum()) for m in mask.values()) == round(N_WEIGHTS * 0.1)
    info = refs[rnd.mask.key].info
    if schedule["schedule"] == "iterative":
        # the exponential schedule: round r keeps 0.1^(r/R) of the weights
        assert info.per_round == pytest.approx([1 - 0.1 ** (r / schedule["rounds"])
                                                   for r in range(1, schedule["rounds"] + 1)], abs=1e-4)
    weights = rt.store.load(refs[rnd.trained.key])["model"]
    assert all(torch.count_nonzero(weights[n][~m]) == 0 for n, m in mask.items())
    assert refs[rnd.evaluate.key].info.test_acc > 0.5
    rt2 = Runtime(Store(tmp_path), "cpu")
    run_plan(plan.nodes, rt2)
    assert rt2.computed == []


def test_prune_at_init_refuses_lth_options():
    from pai_core.spec_io import SpecError

    with pytest.raises(SpecError, match="prune.reinit_control: unknown field"):
        tiny_spec("prune_at_init", prune={"reinit_control": True})
