"""Gradual pruning (Zhu & Gupta): the cubic ramp, hit exactly at its end; by magnitude or by LAMP."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_spec
from pai_core.gradual import GradualMagnitude
from pai_core.paradigms import build_plan
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store

N_WEIGHTS = 256 * 300 + 300 * 100 + 100 * 10


def test_cubic_ramp_values():
    g = GradualMagnitude(0.9, begin=100, end=1100, every=100)
    assert g.sparsity_at(100) == 0 and g.sparsity_at(1100) == pytest.approx(0.9)
    assert g.sparsity_at(600) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert [it for it in range(0, 1300) if g.due(it)] == list(range(100, 1101, 100))


def test_gradual_pat_prunes_during_finetuning_to_the_exact_target(tmp_path):
    spec = tiny_spec("prune_after_training", prune={"schedule": "gradual", "sparsity": 0.8, "rate": None, "rounds": 1,
                                                    "gradual": {"every": 3, "start": 0.0, "end": 0.5}},
                     retrain={"epochs": 2})
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    ft = plan.rounds[1].trained
    assert ft.inputs["start"] is plan.rounds[0].trained, "fine-tunes the dense pretrained net"
    payload = rt.store.load(refs[ft.key])
    mask = payload["mask"]
    assert sum(int(m.sum()) for m in mask.values()) == round(N_WEIGHTS * 0.2)
    assert all(torch.count_nonzero(payload["model"][n][~m]) == 0 for n, m in mask.items())
    updates = refs[ft.key].info.mask_updates
    sp = [u["sparsity"] for u in updates]
    assert sp == sorted(sp) and sp[-1] == pytest.approx(0.8, abs=1e-5)
    assert all(u["sparsity"] == pytest.approx(u["target"], abs=1e-4) for u in updates)
    assert refs[plan.rounds[1].evaluate.key].info.sparsity == pytest.approx(0.8, abs=1e-3)


def test_gradual_is_refused_outside_pat_and_without_a_weight_criterion():
    from pai_core.spec_io import SpecError

    with pytest.raises(SpecError, match="gradual"):
        tiny_spec(prune={"schedule": "gradual", "sparsity": 0.8, "rate": None, "rounds": 1})
    with pytest.raises(SpecError, match=r"prune\.criterion: .*allowed: magnitude, lamp \(got random\)"):
        tiny_spec("prune_after_training", prune={"schedule": "gradual", "sparsity": 0.8, "rate": None,
                                                 "rounds": 1, "criterion": "random"})


def test_gradual_lamp_ranks_by_lamp_scores_of_the_current_weights():
    """One ramp step with criterion lamp keeps what a global selection of LAMP's scores keeps,
    which differs from magnitude's when one layer's weights are much smaller."""
    from torch import nn

    from pai_core.criteria.lamp import lamp_scores
    from pai_core.masks import dense_mask
    from pai_core.selection import select

    net = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 10))
    with torch.no_grad():
        net[1].weight.mul_(0.01)
    mask = dense_mask(net)
    lamp = GradualMagnitude(0.9, 0, 10, 5, criterion="lamp")(10, net, None, mask)
    params = dict(net.named_parameters())
    want = select({n: lamp_scores(params[n].detach()) for n in mask}, mask, 0.1)
    assert all(torch.equal(lamp[n], want[n]) for n in mask)
    magnitude = GradualMagnitude(0.9, 0, 10, 5)(10, net, None, mask)
    assert int(magnitude["1.weight"].sum()) == 0 < int(lamp["1.weight"].sum())


def test_gradual_lamp_is_keyed_and_prunes_to_the_exact_target(tmp_path):
    prune = {"schedule": "gradual", "sparsity": 0.8, "rate": None, "rounds": 1,
             "gradual": {"every": 3, "start": 0.0, "end": 0.5}}
    magnitude = build_plan(tiny_spec("prune_after_training", prune=prune, retrain={"epochs": 2}))
    plan = build_plan(tiny_spec("prune_after_training", prune={**prune, "criterion": "lamp"}, retrain={"epochs": 2}))
    ft, ft_magnitude = plan.rounds[1].trained, magnitude.rounds[1].trained
    assert "criterion" not in ft_magnitude.fields["gradual"] and ft.fields["gradual"]["criterion"] == "lamp"
    assert ft.key != ft_magnitude.key and ft.inputs["start"].key == ft_magnitude.inputs["start"].key
    rt = Runtime(Store(tmp_path), "cpu")
    payload = rt.store.load(run_plan(plan.nodes, rt)[ft.key])
    assert sum(int(m.sum()) for m in payload["mask"].values()) == round(N_WEIGHTS * 0.2)
    assert all(int(m.sum()) >= 1 for m in payload["mask"].values())

