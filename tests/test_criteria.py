"""Every registered criterion, with no per-criterion code: finite scores of the right
shapes, exact sparsity after selection, deterministic under a seed."""
from __future__ import annotations

import pytest
import torch

from pai_core.criteria import criterion_names, get_criterion
from pai_core.data import load
from pai_core.masks import dense_mask
from pai_core.models import build_model
from pai_core.selection import select


def score(name: str, seed: int = 0):
    crit = get_criterion(name)
    data = load("synthetic")
    model = build_model("lenet5", data.in_shape, data.num_classes, seed=0)
    mask = dense_mask(model)
    batches = [(data.train.x[i:i + 50], data.train.y[i:i + 50]) for i in range(0, 200, 50)] if crit.needs_data else None
    return model, mask, crit.score(model, mask, batches, crit.Params(), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", criterion_names())
def test_scores_are_finite_shaped_and_select_exactly(name):
    model, mask, scores = score(name)
    params = dict(model.named_parameters())
    assert set(scores) == set(mask)
    for n, s in scores.items():
        assert s.shape == params[n].shape and torch.isfinite(s).all()
    new = select(scores, mask, 0.1)
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in new.values()) == round(total * 0.1)


@pytest.mark.parametrize("name", criterion_names())
def test_deterministic_under_a_seed(name):
    _, _, a = score(name, seed=1)
    _, _, b = score(name, seed=1)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_magnitude_is_abs_of_the_weights():
    model, _, scores = score("magnitude")
    assert torch.equal(scores["fc1.weight"], model.fc1.weight.detach().abs())


def test_random_depends_on_the_seed():
    _, _, a = score("random", seed=1)
    _, _, b = score("random", seed=2)
    assert not torch.equal(a["fc1.weight"], b["fc1.weight"])
