"""OBD and first-order Taylor scores against hand computations on tiny nets.

Taylor: a bias-free Linear with softmax cross-entropy has the closed-form gradient
G = (P − Y)ᵀ X / N, so (G ⊙ W)² per batch, averaged over batches, is computed by hand.
OBD: Hutchinson's estimate of the Hessian diagonal is compared with the exact diagonal, in
closed form for the Linear (∂²L/∂W_ij² = mean_n p_ni (1 − p_ni) x_nj²) and from
torch.func.hessian for a two-layer net."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pai_core.criteria import ScoreInputs, get_criterion
from pai_core.spec_io import SpecError, parse_spec
from conftest import tiny_raw


def linear_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 2, bias=False))


def batches(n_batches: int = 2, n: int = 4, d: int = 3, classes: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)) for _ in range(n_batches)]


def score(name: str, model: nn.Module, data, seed: int = 0, **params):
    crit = get_criterion(name)
    mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n.endswith("weight")}
    inputs = ScoreInputs(torch.Generator().manual_seed(seed), (3,), 2, iter(data))
    return crit.score(model, mask, inputs, crit.Params(**params))


def test_taylor_is_the_batch_mean_of_squared_g_times_w_by_hand():
    model, data = linear_net(), batches()
    w = model[0].weight.detach()
    by_hand = torch.zeros_like(w)
    for x, y in data:
        p = torch.softmax(x @ w.T, dim=1)
        grad = (p - F.one_hot(y, 2).float()).T @ x / len(x)
        by_hand += (grad * w).square()
    by_hand /= len(data)
    got = score("taylor", model, data, batches=2)["0.weight"]
    assert torch.allclose(got, by_hand, rtol=1e-5, atol=1e-9)
    # the square is per batch: not (mean g · w)², which a sign flip between batches would cancel
    assert not torch.allclose(got, (sum((torch.softmax(x @ w.T, 1) - F.one_hot(y, 2).float()).T @ x / len(x)
                                        for x, y in data) / 2 * w).square(), rtol=1e-3)


def test_obd_hessian_diagonal_matches_the_closed_form_of_a_linear_softmax():
    model, data = linear_net(), batches(n_batches=1)
    w = model[0].weight.detach()
    x, _ = data[0]
    p = torch.softmax(x @ w.T, dim=1)
    h_diag = (p * (1 - p)).T @ x.square() / len(x)  # ∂²L/∂W_ij² for mean cross-entropy
    got = score("obd", model, data, batches=1, samples=4000)["0.weight"]
    assert torch.allclose(got, 0.5 * h_diag * w.square(), rtol=0.15, atol=1e-6)


def test_obd_on_a_two_layer_net_matches_torch_func_hessian():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = batches(n_batches=1, n=8)
    x, y = data[0]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(name):
        def f(t):
            return F.cross_entropy(torch.func.functional_call(model, {**params, name: t}, (x,)), y)
        return f
    got = score("obd", model, data, batches=1, samples=4000)
    for name in ("0.weight", "2.weight"):
        t = params[name]
        exact = torch.func.hessian(loss(name))(t).reshape(t.numel(), t.numel()).diagonal().reshape(t.shape)
        want = 0.5 * exact * t.square()
        assert torch.allclose(got[name], want, rtol=0.2, atol=2e-4 * want.abs().max()), name


def test_obd_is_reproducible_from_its_seed_and_leaves_the_weights_alone():
    model, data = linear_net(), batches()
    before = model[0].weight.detach().clone()
    a = score("obd", model, data, seed=5, batches=2, samples=3)["0.weight"]
    b = score("obd", model, data, seed=5, batches=2, samples=3)["0.weight"]
    c = score("obd", model, data, seed=6, batches=2, samples=3)["0.weight"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("criterion, params, field", [
    ("obd", {"samples": 0}, "prune.params.samples"),
    ("obd", {"batches": -1}, "prune.params.batches"),
    ("taylor", {"batches": 0}, "prune.params.batches"),
    ("taylor", {"samples": 3}, "prune.params.samples: unknown field"),
])
def test_bad_params_are_refused_before_compute_naming_the_field(criterion, params, field):
    raw = tiny_raw("prune_after_training", prune={"criterion": criterion, "params": params, "schedule": "one_shot",
                                                  "sparsity": 0.9, "rate": None, "rounds": 1})
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_spec(raw)
