"""Liu et al. (2019)'s Scratch-E and Scratch-B: a pruned-after-training mask trained from a fresh
init for the pretraining's epochs, or for its FLOPs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_spec
from pai_core import budget
from pai_core.paradigms import build_plan
from pai_core.spec_io import SpecError
from pai_core.specs import TrainSpec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store


def test_a_stretched_schedule_keeps_its_milestones_at_the_same_fractions():
    spec = TrainSpec(optimizer="sgd", lr=0.1, epochs=4, lr_schedule="step", milestones=(2, 3), warmup_iterations=5)
    longer = budget.stretched(spec, 10, 2.5)
    assert (longer.epochs, longer.iterations, longer.milestones, longer.warmup_iterations) == (None, 100, (50, 75), 5)
    assert budget.stretched(spec, 10, 0.5).iterations == 40  # never shorter than the original


def test_the_flops_ratio_counts_kept_multiply_adds_by_hand():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    mask = {"0.weight": torch.ones(2, 1, 3, 3, dtype=torch.bool), "2.weight": torch.ones(3, 32, dtype=torch.bool)}
    mask["0.weight"][1] = False  # one of the two filters: its 9 weights at each of 16 positions
    mask["2.weight"][:, :16] = False
    dense = 2 * (2 * 9 * 16 + 3 * 32)
    pruned = 2 * (9 * 16 + 3 * 16)
    assert budget.flops_ratio(net, mask, (1, 4, 4)) == pytest.approx(dense / pruned)


def _pat_sanity(checks, **sanity):
    return tiny_spec("sanity_checks", model={"name": "lenet5"}, data={"dataset": "synthetic", "batch_size": 50},
                     retrain={"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "epochs": 1},
                     prune={"schedule": "one_shot", "sparsity": 0.5, "rate": None, "rounds": 1, "scope": "layerwise",
                            "structure": "filter"},
                     sanity={"base": "prune_after_training", "checks": checks, **sanity})


def test_scratch_e_and_b_train_the_pruned_net_from_a_fresh_init(tmp_path):
    spec = _pat_sanity(["reinit", "scratch_e", "scratch_b"], budget_cap=3.0)
    plan = build_plan(spec)
    assert [r.name for r in plan.rounds] == ["original", "reinit", "scratch_e", "scratch_b"]
    reinit, scratch_e, scratch_b = plan.rounds[1:]
    assert scratch_e.trained.inputs["start"].key == reinit.trained.inputs["start"].key  # the same fresh init
    assert scratch_e.trained.fields["train"] == spec.base_spec.train.key_fields()  # pretraining's schedule
    assert reinit.trained.fields["train"] == spec.base_spec.retrain.key_fields()  # reinit: the fine-tune's
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    pretrained = refs[plan.rounds[0].trained.inputs["start"].key].info.iteration  # the dense training's length
    e_iters = refs[scratch_e.trained.key].info.iteration
    assert e_iters == pretrained and refs[plan.rounds[0].trained.key].info.iteration < pretrained
    mask = rt.store.load(refs[plan.rounds[0].mask.key])["mask"]
    from pai_core.models import build_model

    model = build_model("lenet5", (1, 16, 16), 10, seed=0)
    ratio = budget.flops_ratio(model, mask, (1, 16, 16))
    info = refs[scratch_b.trained.key].info
    assert info.budget["flops_ratio"] == pytest.approx(ratio) and ratio > 1.5
    assert info.iteration == round(e_iters * min(ratio, 3.0))
    weights = rt.store.load(refs[scratch_b.trained.key])["model"]
    for n, m in mask.items():  # trained under the mask
        assert int(weights[n][~m].ne(0).sum()) == 0


def test_scratch_checks_are_refused_where_they_mean_nothing():
    with pytest.raises(SpecError, match=r"^sanity.checks: scratch_e trains a pruned-after-training mask from "
                                        r"scratch; a lottery_ticket mask is trained from an init already"):
        tiny_spec("sanity_checks", sanity={"base": "lottery_ticket", "checks": ["scratch_e"]})
    with pytest.raises(SpecError, match=r"^sanity.budget_cap: only the scratch_b check uses it"):
        _pat_sanity(["scratch_e"], budget_cap=2.0)
