"""`prune.ignore`: named layers stay dense in every paradigm, out of the sparsity, and a spec
without it keeps its keys."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_spec
from pai_core.masks import dense_mask, sparsity
from pai_core.paradigms import build_plan
from pai_core.spec_io import SpecError
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store


def _run(spec, tmp_path):
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    return plan, rt, run_plan(plan.nodes, rt)


def test_lth_keeps_an_ignored_layer_dense_and_prunes_the_rest_exactly(tmp_path):
    spec = tiny_spec("lottery_ticket", prune={"ignore": ["fc3.weight"]})
    plan, rt, refs = _run(spec, tmp_path)
    for r, rnd in enumerate(plan.rounds[1:], start=1):
        mask = rt.store.load(refs[rnd.mask.key])["mask"]
        assert sorted(mask) == ["fc1.weight", "fc2.weight"]
        total = sum(m.numel() for m in mask.values())  # fc1 (300 × the synthetic 256 inputs) + fc2
        assert sum(int(m.sum()) for m in mask.values()) == round(total * 0.8 ** r)
        weights = rt.store.load(refs[rnd.trained.key])["model"]
        assert int((weights["fc3.weight"] == 0).sum()) == 0  # trained dense
        assert refs[rnd.evaluate.key].info.sparsity == pytest.approx(sparsity(mask))
    plain = build_plan(tiny_spec("lottery_ticket"))
    assert plain.rounds[1].mask.key != plan.rounds[1].mask.key  # the ignore list is in the key
    assert plain.rounds[0].trained.key == plan.rounds[0].trained.key  # the dense round is shared


def test_patterns_match_by_fnmatch_and_typos_are_refused_before_compute():
    spec = tiny_spec("prune_at_init", prune={"criterion": "snip", "schedule": "one_shot", "sparsity": 0.9,
                                             "rate": None, "rounds": 1, "ignore": ["fc1.*", "fc3.weight"]})
    assert build_plan(spec).rounds[1].mask is not None
    with pytest.raises(SpecError, match=r"^prune.ignore: 'fc9.weight' matches no prunable parameter of "
                                        r"lenet_300_100; allowed: fc1.weight, fc2.weight, fc3.weight"):
        tiny_spec("lottery_ticket", prune={"ignore": ["fc9.weight"]})
    with pytest.raises(SpecError, match=r"^prune.ignore: every prunable parameter of lenet_300_100 is ignored"):
        tiny_spec("lottery_ticket", prune={"ignore": ["fc*"]})
    with pytest.raises(SpecError, match=r"^prune.ignore: the channel search ranks every BatchNorm channel"):
        tiny_spec("early_bird", model={"name": "conv2", "batch_norm": True},
                  data={"dataset": "synthetic_cifar", "batch_size": 50},
                  prune={"schedule": "one_shot", "sparsity": 0.5, "rate": None, "rounds": 1,
                         "ignore": ["fc1.weight"]},
                  early_bird={"structure": "channel", "window": 2})


def test_iterative_snip_and_gradual_pat_leave_the_ignored_layer_out(tmp_path):
    spec = tiny_spec("prune_at_init", prune={"criterion": "snip", "schedule": "iterative", "sparsity": 0.9,
                                             "rate": None, "rounds": 3, "ignore": ["fc1.weight"]})
    plan, rt, refs = _run(spec, tmp_path / "pai")
    mask = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    assert sorted(mask) == ["fc2.weight", "fc3.weight"]
    assert sum(int(m.sum()) for m in mask.values()) == round((300 * 100 + 100 * 10) * 0.1)
    gradual = tiny_spec("prune_after_training", prune={"schedule": "gradual", "sparsity": 0.8, "rate": None,
                                                       "rounds": 1, "ignore": ["fc1.weight"],
                                                       "gradual": {"every": 5, "end": 0.5}})
    plan, rt, refs = _run(gradual, tmp_path / "pat")
    trained = rt.store.load(refs[plan.rounds[1].trained.key])
    assert sorted(trained["mask"]) == ["fc2.weight", "fc3.weight"]
    assert int((trained["model"]["fc1.weight"] == 0).sum()) == 0
    assert sparsity(trained["mask"]) == pytest.approx(0.8, abs=1e-3)


def test_rigl_moves_the_mask_of_every_layer_but_the_ignored_one(tmp_path):
    spec = tiny_spec("dynamic_sparse", dynamic={"method": "rigl", "update_interval": 5},
                     prune={"criterion": "random", "schedule": "one_shot", "sparsity": 0.9, "rate": None,
                            "rounds": 1, "scope": "erk", "ignore": ["fc1.weight"]})
    plan, rt, refs = _run(spec, tmp_path)
    trained = rt.store.load(refs[plan.rounds[1].trained.key])
    assert sorted(trained["mask"]) == ["fc2.weight", "fc3.weight"]
    assert int((trained["model"]["fc1.weight"] == 0).sum()) == 0
    assert sparsity(trained["mask"]) == pytest.approx(0.9, abs=2e-3)


def test_filter_pruning_keeps_an_ignored_layers_filters_and_their_residual_group(tmp_path):
    spec = tiny_spec("prune_after_training", model={"name": "resnet20", "width": 0.25},
                     data={"dataset": "synthetic_cifar", "batch_size": 50}, train={"epochs": 1},
                     retrain={"epochs": 1},
                     prune={"schedule": "one_shot", "sparsity": 0.5, "rate": None, "rounds": 1, "scope": "layerwise",
                            "structure": "filter", "ignore": ["conv1.weight", "layer1.0.conv1.weight"]})
    plan, rt, refs = _run(spec, tmp_path)
    mask = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    rows = lambda n: mask[f"{n}.weight"].flatten(1).any(1)  # noqa: E731
    for kept in ("conv1", "layer1.0.conv1", "layer1.2.conv2"):  # conv1's stream group goes with it
        assert bool(rows(kept).all()), kept
    assert int(rows("layer1.1.conv1").sum()) == 2 and int(rows("layer2.1.conv2").sum()) == 4  # half of 4, of 8
    ev = refs[plan.rounds[1].evaluate.key]
    assert ev.info.test_acc >= 0.0
    assert "conv1.weight" in mask and bool(mask["conv1.weight"].all())  # consumers keep their inputs too


def test_dense_mask_ignores_by_pattern():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert sorted(dense_mask(net, True, ["0.*"])) == ["2.bias", "2.weight"]
    assert sorted(dense_mask(net, False, ["2.weight"])) == ["0.weight"]
