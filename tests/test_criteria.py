"""Criteria. Registry-parametrized tests cover every criterion with no per-criterion code
(finite scores of the right shapes, exact sparsity, deterministic, weights untouched);
the rest check each criterion against a hand computation on a tiny network."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pai_core.criteria import ScoreInputs, criterion_names, get_criterion
from pai_core.data import load
from pai_core.masks import dense_mask
from pai_core.models import build_model
from pai_core.selection import select


def run(name: str, model=None, seed: int = 0, params=None, data_name="synthetic", **kw):
    crit = get_criterion(name)
    data = load(data_name)
    model = model or build_model("lenet5", data.in_shape, data.num_classes, seed=0)
    mask = dense_mask(model)
    batches = [(data.train.x[i:i + 50], data.train.y[i:i + 50]) for i in range(0, 500, 50)]
    ctx = ScoreInputs(torch.Generator().manual_seed(seed), data.in_shape, data.num_classes,
                      iter(batches) if crit.needs_data else None,
                      rebuild=lambda s: build_model("lenet5", data.in_shape, data.num_classes, seed=s))
    if crit.chooses_count:  # it picks the set for a count itself: the 10 % the tests select
        ctx.keep = round(sum(m.numel() for m in mask.values()) * 0.1)
    return model, mask, crit.score(model, mask, ctx, crit.Params(**(params or {}), **kw))


@pytest.mark.parametrize("name", criterion_names())
def test_scores_are_finite_shaped_select_exactly_and_leave_weights_alone(name):
    model = build_model("lenet5", (1, 16, 16), 10, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, mask, scores = run(name, model)
    params = dict(model.named_parameters())
    assert set(scores) == set(mask)
    for n, s in scores.items():
        assert s.shape == params[n].shape and torch.isfinite(s).all()
    new = select(scores, mask, 0.1)
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in new.values()) == round(total * 0.1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", criterion_names())
def test_deterministic_under_a_seed(name):
    _, _, a = run(name, seed=1)
    _, _, b = run(name, seed=1)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_magnitude_is_abs_of_the_weights():
    model, _, scores = run("magnitude")
    assert torch.equal(scores["fc1.weight"], model.fc1.weight.detach().abs())


def test_random_depends_on_the_seed():
    _, _, a = run("random", seed=1)
    _, _, b = run("random", seed=2)
    assert not torch.equal(a["fc1.weight"], b["fc1.weight"])


class TwoLayer(nn.Module):
    def __init__(self, d_in=4, hidden=5, d_out=3, bias=False):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(d_in, hidden, bias=bias), nn.Linear(hidden, d_out, bias=bias)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_snip_equals_hand_computed_abs_g_times_w():
    net = TwoLayer(d_in=256, hidden=7, d_out=10)
    data = load("synthetic")
    x, y = data.train.x[:50].flatten(1), data.train.y[:50]
    ctx = ScoreInputs(torch.Generator(), (1, 16, 16), 10, iter([(data.train.x[:50], y)]))
    scores = get_criterion("snip").score(net, dense_mask(net), ctx, get_criterion("snip").Params())
    # Backprop by hand: δ2 = (softmax − onehot)/N, ∂L/∂W2 = δ2ᵀh, δ1 = δ2 W2 ⊙ 1[a1 > 0], ∂L/∂W1 = δ1ᵀx.
    with torch.no_grad():
        a1 = x @ net.fc1.weight.T
        h = a1.clamp(min=0)
        d2 = (torch.softmax(h @ net.fc2.weight.T, 1) - F.one_hot(y, 10)) / len(y)
        g2, d1 = d2.T @ h, (d2 @ net.fc2.weight) * (a1 > 0)
        g1 = d1.T @ x
    torch.testing.assert_close(scores["fc2.weight"], (g2 * net.fc2.weight).abs(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(scores["fc1.weight"], (g1 * net.fc1.weight).abs(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_is_theta_times_hessian_gradient_with_tempered_logits(temperature):
    """Against an independent Hessian-vector product (torch.func.jvp of the gradient)."""
    net = TwoLayer(d_in=256, hidden=6, d_out=10, bias=True)
    data = load("synthetic")
    crit = get_criterion("grasp")
    params = crit.Params(samples_per_class=2, temperature=temperature)
    batches = [(data.train.x[i:i + 50], data.train.y[i:i + 50]) for i in range(0, 500, 50)]
    mask = dense_mask(net)
    scores = crit.score(net, mask, ScoreInputs(torch.Generator(), (1, 16, 16), 10, iter(batches)), params)

    from pai_core.criteria.grasp import balanced_sample
    x, y = balanced_sample(iter(batches), 10, 2)
    assert torch.bincount(y, minlength=10).tolist() == [2] * 10
    names = list(mask)
    frozen = {k: v.detach() for k, v in net.named_parameters() if k not in names}
    theta = tuple(dict(net.named_parameters())[n].detach() for n in names)

    def grad_fn(*w):
        def loss(*w2):
            out = torch.func.functional_call(net, {**frozen, **dict(zip(names, w2))}, (x,))
            return F.cross_entropy(out / temperature, y)
        return torch.func.grad(loss, argnums=tuple(range(len(w))))(*w)

    g = grad_fn(*theta)
    _, hg = torch.func.jvp(grad_fn, theta, g)
    for n, w, h in zip(names, theta, hg):
        # GraSP removes the largest −θ⊙Hg, so "keep" is its negation: +θ⊙Hg.
        torch.testing.assert_close(scores[n], w * h, rtol=1e-4, atol=1e-5 * float((w * h).abs().max()))
    if temperature == 1.0:
        hot = crit.score(net, mask, ScoreInputs(torch.Generator(), (1, 16, 16), 10, iter(batches)),
                         crit.Params(samples_per_class=2, temperature=200.0))
        assert not torch.allclose(hot["fc1.weight"], scores["fc1.weight"])


def test_synflow_two_layer_linear_closed_form():
    net = TwoLayer(d_in=3, hidden=4, d_out=2)
    ctx = ScoreInputs(torch.Generator(), (3,), 2)
    s = get_criterion("synflow").score(net, dense_mask(net), ctx, get_criterion("synflow").Params())
    w1, w2 = net.fc1.weight.detach().double().abs(), net.fc2.weight.detach().double().abs()
    # R = 1ᵀ|W2||W1|1, so score(W1[j,i]) = |W1[j,i]|·Σ_k|W2[k,j]| and score(W2[k,j]) = |W2[k,j]|·Σ_i|W1[j,i]|.
    torch.testing.assert_close(s["fc1.weight"], w1 * w2.sum(0)[:, None])
    torch.testing.assert_close(s["fc2.weight"], w2 * w1.sum(1)[None, :])


def test_synflow_conserves_flow_through_every_hidden_neuron_of_lenet():
    net = build_model("lenet_300_100", (1, 28, 28), 10, seed=0)
    ctx = ScoreInputs(torch.Generator(), (1, 28, 28), 10)
    s = get_criterion("synflow").score(net, dense_mask(net), ctx, get_criterion("synflow").Params())
    assert all(v.dtype == torch.float64 for v in s.values())
    for inp, out in (("fc1.weight", "fc2.weight"), ("fc2.weight", "fc3.weight")):
        entering, leaving = s[inp].sum(1), s[out].sum(0)
        torch.testing.assert_close(entering, leaving, rtol=1e-6, atol=0)
