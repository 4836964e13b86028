"""NTK-SAP against hand computations: the mask gradient of one sample equals an explicit
autograd unroll on a two-layer MLP and the closed form of a linear layer (where θ cancels);
BatchNorm takes each Gaussian batch's own statistics; the score does not depend on the init
being pruned (fresh inits), only on the seed; pruned weights score 0; the paper's 20
exponential rounds are the default at init; bad params are refused by name before any compute."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import ROOT, tiny_raw
from pai_core.criteria import ScoreInputs, get_criterion
from pai_core.criteria.ntk_sap import batch_norm_statistics, sample_grads
from pai_core.masks import dense_mask
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.selection import select
from pai_core.spec_io import SpecError, load_spec, parse_spec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5, bias=bias).double(), nn.Linear(5, 3, bias=bias).double()

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_one_sample_is_the_mask_gradient_of_an_explicit_unroll():
    torch.manual_seed(0)
    net = MLP()
    x = torch.randn(6, 4, dtype=torch.float64)
    mask = {"fc1.weight": torch.rand(5, 4) > 0.3, "fc2.weight": torch.rand(3, 5) > 0.3}
    noise = {n: 0.01 * torch.randn_like(dict(net.named_parameters())[n]) for n in mask}
    got = sample_grads(net, mask, x, noise)
    w1, b1, w2, b2 = (p.detach() for p in (net.fc1.weight, net.fc1.bias, net.fc2.weight, net.fc2.bias))
    c1, c2 = (mask[n].double().requires_grad_() for n in ("fc1.weight", "fc2.weight"))

    def f(v1, v2):
        return torch.relu(x @ (c1 * v1).T + b1) @ (c2 * v2).T + b2

    gap = f(w1, w2) - f(w1 + noise["fc1.weight"], w2 + noise["fc2.weight"])
    want = torch.autograd.grad((gap ** 2).sum(), [c1, c2])
    torch.testing.assert_close(got["fc1.weight"], want[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got["fc2.weight"], want[1], rtol=1e-12, atol=1e-15)


def test_a_linear_layer_matches_the_closed_form_and_its_weights_cancel():
    # f = (c ⊙ W) x: the gap is −(c ⊙ N) x, so ∂/∂c_ij Σ_b ||gap_b||² = 2 Σ_b ((c ⊙ N) x_b)_i x_bj N_ij
    torch.manual_seed(1)
    net = nn.Linear(4, 3, bias=False).double()
    x, n = torch.randn(7, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    c = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    want = 2 * ((x @ (c * n).T).T @ x) * n
    got = sample_grads(net, {"weight": c}, x, {"weight": n})["weight"]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        net.weight.normal_()
    torch.testing.assert_close(sample_grads(net, {"weight": c}, x, {"weight": n})["weight"], want,
                               rtol=1e-12, atol=1e-14)


def test_batch_norm_takes_the_gaussian_batchs_own_statistics():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with torch.no_grad():
        net[1].running_mean.fill_(5.0)
    x = torch.randn(8, 1, 6, 6)
    batch_norm_statistics(net, x)
    h = net[0](x).detach()
    assert not net.training
    torch.testing.assert_close(net[1].running_mean, h.mean((0, 2, 3)))
    torch.testing.assert_close(net[1].running_var, h.var((0, 2, 3), unbiased=True))


def scores(seed: int, model_seed: int = 0, mask=None, **params):
    crit = get_criterion("ntk_sap")
    build = lambda s: build_model("lenet5", (1, 16, 16), 10, seed=s)  # noqa: E731
    model = build(model_seed)
    mask = mask if mask is not None else dense_mask(model)
    inputs = ScoreInputs(torch.Generator().manual_seed(seed), (1, 16, 16), 10, rebuild=build)
    return crit.score(model, mask, inputs, crit.Params(samples=2, inputs_per_class=2, **params)), mask


def test_the_score_depends_on_the_seed_not_on_the_init_being_pruned():
    a, _ = scores(0, model_seed=0)
    b, _ = scores(0, model_seed=123)
    c, _ = scores(1, model_seed=0)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert all((v > 0).float().mean() > 0.9 for v in a.values())


def test_pruned_weights_score_zero_and_batches_split_the_pruning_set():
    full, mask = scores(0)
    half = select(full, mask, 0.5, "global")
    again, _ = scores(0, mask=half, batch_size=7)  # 20 inputs: batches of 7, 7, 6, each a fresh init
    assert all((again[n][~half[n]] == 0).all() and (again[n][half[n]] > 0).float().mean() > 0.9 for n in half)


def test_missing_rebuild_is_refused():
    crit = get_criterion("ntk_sap")
    model = build_model("lenet5", (1, 16, 16), 10, seed=0)
    with pytest.raises(ValueError, match="rebuild is required"):
        crit.score(model, dense_mask(model), ScoreInputs(torch.Generator(), (1, 16, 16), 10), crit.Params())


def at_init(**prune) -> dict:
    return tiny_raw("prune_at_init", prune={"criterion": "ntk_sap", "sparsity": 0.9, "rounds": None, "rate": None,
                                            "schedule": None, **prune})


def clean(raw: dict) -> dict:
    raw["prune"] = {k: v for k, v in raw["prune"].items() if v is not None}
    return raw


def test_twenty_exponential_rounds_by_default_and_the_mask_is_exact(tmp_path):
    spec = parse_spec(clean(at_init(params={"samples": 1, "inputs_per_class": 1})))
    assert spec.prune.schedule == "iterative" and spec.prune.rounds == 20
    plan = build_plan(spec)
    node = plan.rounds[1].mask
    assert node.stage == "iterative_mask" and len(node.fields["densities"]) == 20
    rt = Runtime(Store(tmp_path), "cpu")
    mask = rt.store.load(run_plan(plan.nodes[: plan.nodes.index(node) + 1], rt)[node.key])["mask"]
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(total * 0.1)


@pytest.mark.parametrize("params, message", [
    ({"samples": 0}, r"prune\.params\.samples: Input should be greater than 0"),
    ({"epsilon": -1}, r"prune\.params\.epsilon: Input should be greater than 0"),
    ({"R": 5}, r"prune\.params\.R: unknown field; allowed: samples, epsilon, inputs_per_class, batch_size"),
])
def test_bad_params_are_refused_by_name_before_any_compute(params, message, monkeypatch):
    import pai_core.criteria.ntk_sap as mod
    monkeypatch.setattr(mod, "sample_grads", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(SpecError, match=message):
        parse_spec(clean(at_init(params=params)))


def test_the_example_config_shares_the_snip_configs_init_and_dense_round():
    mine = build_plan(load_spec(ROOT / "configs/prune_at_init/ntk_sap_lenet300_mnist.yaml", []))
    snip = build_plan(load_spec(ROOT / "configs/prune_at_init/snip_lenet300_mnist.yaml", []))
    assert [n.key for n in mine.nodes_by_round()[0]] == [n.key for n in snip.nodes_by_round()[0]]
    assert mine.rounds[1].mask.fields["criterion"] == "ntk_sap"
