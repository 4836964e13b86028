"""Scores → masks: exact counts, deterministic ties, only survivors re-ranked, masks held."""
from __future__ import annotations

import pytest
import torch

from pai_core.masks import MaskEnforcer, dense_mask, density_report, prunable_names, sparsity
from pai_core.models import build_model
from pai_core.selection import select
from pai_core.specs import TrainSpec
from pai_core.training import train
from pai_core.data import load

LENET_WEIGHTS = 266_200


def lenet():
    return build_model("lenet_300_100", (1, 28, 28), 10, seed=0)


def magnitude(model, names):
    params = dict(model.named_parameters())
    return {n: params[n].detach().abs() for n in names}


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_iterative_rounds_keep_exact_counts_and_nest(scope):
    model = lenet()
    mask = dense_mask(model)
    scores = magnitude(model, mask)
    for r, expected_sparsity in enumerate([0.2, 0.36, 0.488], start=1):
        new = select(scores, mask, 0.8 ** r, scope)
        if scope == "global":
            assert sum(int(m.sum()) for m in new.values()) == round(LENET_WEIGHTS * 0.8 ** r)
        else:
            for n, m in new.items():
                assert int(m.sum()) == round(m.numel() * 0.8 ** r)
        assert abs(sparsity(new) - expected_sparsity) < 1e-5
        assert all(not (new[n] & ~mask[n]).any() for n in new), "a pruned weight came back"
        mask = new


def test_global_counts_for_the_lth_acceptance_rounds():
    model = lenet()
    mask, kept = dense_mask(model), []
    for r in (1, 2, 3):
        mask = select(magnitude(model, mask), mask, 0.8 ** r)
        kept.append(sum(int(m.sum()) for m in mask.values()))
    assert kept == [212_960, 170_368, 136_294]  # 20 %, 36 % exactly; 48.8 % to the nearest weight


def test_ties_go_to_the_lower_index_every_time():
    scores = {"a": torch.ones(10), "b": torch.ones(10)}
    prev = {"a": torch.ones(10, dtype=torch.bool), "b": torch.ones(10, dtype=torch.bool)}
    m = select(scores, prev, 0.25)
    assert m["a"].nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4] and not m["b"].any()
    assert all(torch.equal(m[k], select(scores, prev, 0.25)[k]) for k in m)


def test_only_survivors_are_ranked():
    scores = {"w": torch.tensor([100.0, 1.0, 2.0, 3.0])}
    prev = {"w": torch.tensor([False, True, True, True])}
    m = select(scores, prev, 0.5)
    assert m["w"].tolist() == [False, False, True, True]


def test_min_density_floor_keeps_a_weak_layer_alive():
    scores = {"strong": torch.full((100,), 10.0), "weak": torch.rand(100)}
    prev = {k: torch.ones(100, dtype=torch.bool) for k in scores}
    assert not select(scores, prev, 0.2)["weak"].any()
    m = select(scores, prev, 0.2, min_density=0.05)
    assert int(m["weak"].sum()) == 5 and sum(int(v.sum()) for v in m.values()) == 40
    lw = select(scores, prev, 0.01, scope="layerwise", min_density=0.05)
    assert int(lw["weak"].sum()) == 5 and int(lw["strong"].sum()) == 5


def test_nan_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        select({"w": torch.tensor([float("nan"), 1.0])}, {"w": torch.ones(2, dtype=torch.bool)}, 0.5)


def test_prunable_are_conv_and_linear_weights_by_default():
    model = build_model("lenet5", (1, 28, 28), 10, seed=0)
    assert all(n.endswith("weight") for n in prunable_names(model))
    assert len(prunable_names(model, include_biases=True)) == 2 * len(prunable_names(model))


@pytest.mark.parametrize("optimizer", [
    {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    {"optimizer": "adam", "lr": 0.01, "weight_decay": 1e-3},
])
def test_pruned_weights_stay_exactly_zero_through_training(optimizer):
    data = load("synthetic")
    model = build_model("lenet_300_100", data.in_shape, data.num_classes, seed=0)
    mask = select(magnitude(model, dense_mask(model)), dense_mask(model), 0.1)
    # Momentum first builds up on the dense net, so a leak would show at once.
    train(model, data, TrainSpec(**optimizer, iterations=5), batch_size=50, order_seed=0)
    train(model, data, TrainSpec(**optimizer, epochs=2), batch_size=50, order_seed=0, mask=mask)
    params = dict(model.named_parameters())
    for n, m in mask.items():
        assert torch.count_nonzero(params[n][~m]) == 0
        assert torch.count_nonzero(params[n][m]) > 0.99 * int(m.sum())
    assert density_report({n: params[n] != 0 for n in mask})["total"]["kept"] == sum(int(m.sum()) for m in mask.values())


def test_enforcer_skips_all_ones_masks():
    model = lenet()
    assert MaskEnforcer(model, dense_mask(model)).pairs == []
