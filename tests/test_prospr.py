"""ProsPr against an explicit unroll: on a float64 two-layer MLP the M inner SGD steps are
written out in the test with an explicit mask variable c (w_0 = c ⊙ m ⊙ w), and ∂L(w_M)/∂c
is taken by autograd through them. Also: M = 0 is SNIP, a finite difference in c confirms the
second-order terms, the model and BN statistics are untouched, masks are exact, bad params are
refused by name before any compute, and existing configs keep their keys."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, tiny_raw
from pai_core.criteria import ScoreInputs, get_criterion
from pai_core.criteria.prospr import meta_gradients
from pai_core.masks import apply_mask
from pai_core.paradigms import build_plan
from pai_core.spec_io import SpecError, load_spec, parse_spec
from pai_core.stages import Runtime, run_plan
from pai_core.stages.common import model_from
from pai_core.stages.score import score
from pai_core.store import Store

D_IN, HIDDEN, D_OUT = 4, 5, 3


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(D_IN, HIDDEN).double(), nn.Linear(HIDDEN, D_OUT).double()

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def data(n_batches: int = 6, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, D_IN, generator=g, dtype=torch.float64), torch.randint(0, D_OUT, (n,), generator=g))
            for _ in range(n_batches)]


def full_mask(net):
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in net.named_parameters() if n.endswith("weight")}


def by_hand(net, batches, steps, lr, mask, momentum=0.0, per_step=1, fresh=True, first_order=False):
    """∂L(w_M)/∂c: every step written out, biases trained, the mask kept on the gradients."""
    W1, b1, W2, b2 = (p.detach().clone() for p in (net.fc1.weight, net.fc1.bias, net.fc2.weight, net.fc2.bias))
    m1, m2 = mask["fc1.weight"].double(), mask["fc2.weight"].double()
    c1 = torch.ones_like(W1, requires_grad=True)
    c2 = torch.ones_like(W2, requires_grad=True)
    w = [c1 * m1 * W1, b1.requires_grad_(), c2 * m2 * W2, b2.requires_grad_()]

    def loss(w, k):
        group = batches[k * per_step:(k + 1) * per_step] if fresh else batches[:per_step]
        return sum(F.cross_entropy(torch.relu(x @ w[0].T + w[1]) @ w[2].T + w[3], y) for x, y in group) / per_step

    v = [None] * 4
    for t in range(steps):
        g = list(torch.autograd.grad(loss(w, t), w, create_graph=not first_order))
        g[0], g[2] = g[0] * m1, g[2] * m2
        if momentum:
            v = g if t == 0 else [momentum * vi + gi for vi, gi in zip(v, g)]
            g = v
        w = [wi - lr * gi for wi, gi in zip(w, g)]
    return dict(zip(("fc1.weight", "fc2.weight"), torch.autograd.grad(loss(w, steps), [c1, c2])))


def prospr(net, data_, mask=None, **params):
    crit = get_criterion("prospr")
    mask = mask or full_mask(net)
    return crit.score(net, mask, ScoreInputs(torch.Generator(), (D_IN,), D_OUT, iter(data_)), crit.Params(**params))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("fresh", [True, False])
def test_score_is_the_abs_meta_gradient_of_an_explicit_unroll(steps, fresh):
    net, batches = MLP(), data()
    want = by_hand(net, batches, steps, 0.5, full_mask(net), fresh=fresh)
    got = prospr(net, batches, meta_steps=steps, lr=0.5, fresh_batches=fresh)
    for n in want:
        close(got[n], want[n].abs())
    if steps == 2 and fresh:  # the steps' batches matter: reusing one gives other scores
        other = prospr(net, batches, meta_steps=steps, lr=0.5, fresh_batches=False)
        assert not torch.allclose(other["fc1.weight"], got["fc1.weight"])


def test_momentum_batches_per_step_and_a_partial_mask_match_the_unroll():
    net, batches = MLP(), data()
    mask = full_mask(net)
    mask["fc1.weight"][0, :2] = False
    mask["fc2.weight"][1, 3] = False
    apply_mask(net, mask)  # the score stage hands criteria the masked net
    want = by_hand(net, batches, 2, 0.3, mask, momentum=0.9, per_step=2)
    got = prospr(net, batches, mask, meta_steps=2, lr=0.3, momentum=0.9, batches=2)
    for n in want:
        close(got[n], want[n].abs())
    assert (got["fc1.weight"][0, :2] == 0).all() and got["fc2.weight"][1, 3] == 0, "a pruned weight stays pruned"


def test_zero_steps_is_snip():
    net, batches = MLP(), data()
    meta = meta_gradients(net, full_mask(net), iter(batches), steps=0, lr=0.5)
    snip = get_criterion("snip")
    s = snip.score(net, full_mask(net), ScoreInputs(torch.Generator(), (D_IN,), D_OUT, iter(batches)), snip.Params())
    for n in s:
        close(meta[n].abs(), s[n])


def test_second_order_terms_are_in_the_score_and_first_order_drops_them():
    """A central difference of L(w_2(c)) in one c entry equals the full meta-gradient; the
    first-order variant is |∂L(w_M)/∂w_M ⊙ w_init| instead (inner gradients held constant)."""
    net, batches = MLP(), data()
    full = meta_gradients(net, full_mask(net), iter(batches), steps=2, lr=0.5)

    def meta_loss(c_entry: float) -> float:
        probe = MLP()
        with torch.no_grad():
            probe.fc1.weight[2, 1] *= c_entry
        w = dict(probe.named_parameters())
        for t in range(2):
            g = torch.autograd.grad(F.cross_entropy(probe(batches[t][0]), batches[t][1]), list(w.values()))
            with torch.no_grad():
                for p, gi in zip(w.values(), g):
                    p -= 0.5 * gi
        with torch.no_grad():
            return float(F.cross_entropy(probe(batches[2][0]), batches[2][1]))

    eps = 1e-5
    fd = (meta_loss(1 + eps) - meta_loss(1 - eps)) / (2 * eps)
    assert abs(fd - float(full["fc1.weight"][2, 1])) < 1e-8 * max(1.0, abs(fd))
    first = prospr(net, batches, meta_steps=2, lr=0.5, first_order=True)
    for n in first:
        close(first[n], by_hand(net, batches, 2, 0.5, full_mask(net), first_order=True)[n].abs())
    assert not torch.allclose(first["fc1.weight"], full["fc1.weight"].abs(), rtol=1e-3)


def test_too_few_batches_are_refused_naming_the_field():
    net = MLP()
    msg = r"prune\.params\.meta_steps: prospr needs 4 training batches, the data gives 3"
    with pytest.raises(ValueError, match=msg):
        prospr(net, data(3), meta_steps=3)


# ------------------------------------------------------------------- through the spec and the stages

BN_MODEL = {"name": "conv2", "width": 0.125, "batch_norm": True}


def at_init(**prune):
    raw = tiny_raw("prune_at_init", train={"epochs": 1})
    raw["prune"] = {"criterion": "prospr", "schedule": "one_shot", "sparsity": 0.9, **prune}
    return raw


def test_weights_and_batchnorm_statistics_are_unchanged_after_scoring(tmp_path):
    raw = at_init()
    raw["model"] = BN_MODEL
    spec = parse_spec(raw)
    plan = build_plan(spec)
    node = plan.rounds[1].mask.inputs["scores"]
    assert node.fields["bn_mode"] == "train"  # the reference scores with net.train()
    rt = Runtime(Store(tmp_path), "cpu")
    init = plan.nodes[0]
    refs = run_plan([init], rt)
    model = model_from(refs[init.key], rt.store.load(refs[init.key]), rt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()
            if n.endswith("weight") and p.dim() > 1}
    s = score(model, mask, node, refs[init.key].info.arch, torch.Generator().manual_seed(0), rt)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(s) == set(mask) and all(torch.isfinite(v).all() and (v >= 0).all() for v in s.values())
    assert any((v > 0).any() for v in s.values())


def test_the_mask_has_exactly_the_target_sparsity(tmp_path):
    plan = build_plan(parse_spec(at_init(params={"meta_steps": 2})))
    node = plan.rounds[1].mask
    rt = Runtime(Store(tmp_path), "cpu")
    mask = rt.store.load(run_plan(plan.nodes[: plan.nodes.index(node) + 1], rt)[node.key])["mask"]
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(total * 0.1)


@pytest.mark.parametrize("params, message", [
    ({"meta_steps": 0}, r"prune\.params\.meta_steps: Input should be greater than 0"),
    ({"lr": -0.1}, r"prune\.params\.lr: Input should be greater than 0"),
    ({"momentum": 1.0}, r"prune\.params\.momentum: Input should be less than 1"),
    ({"steps": 3}, r"prune\.params\.steps: unknown field; allowed: meta_steps, lr, momentum, batches"),
])
def test_bad_params_are_refused_by_name_before_any_compute(params, message, monkeypatch):
    import pai_core.criteria.prospr as mod
    monkeypatch.setattr(mod, "meta_gradients", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(SpecError, match=message):
        parse_spec(at_init(params=params))


def test_existing_configs_keep_their_stage_keys():
    """Pinned before prospr was added: registering a criterion changes no other spec's keys."""
    plan = build_plan(load_spec(ROOT / "configs/prune_at_init/snip_lenet300_mnist.yaml", []))
    keys = {(r.name, n.role): n.key for r, nodes in zip(plan.rounds, plan.nodes_by_round()) for n in nodes}
    assert keys == {
        ("dense", "init"): "8cc42ad981beb3a24757", ("dense", "pretrain"): "57d5dc76798b957cc191",
        ("dense", "evaluate"): "a92fc5aca01c641c4e98", ("snip", "score"): "955f346a6ace3677b27c",
        ("snip", "mask"): "60bf5e81864469d6e9fc", ("snip", "sparse_train"): "2b91fde6416a3f400cce",
        ("snip", "evaluate"): "b4802474d96c35aba965",
    }


def test_the_example_config_shares_the_snip_configs_init_and_dense_round():
    mine = build_plan(load_spec(ROOT / "configs/prune_at_init/prospr_lenet300_mnist.yaml", []))
    snip = build_plan(load_spec(ROOT / "configs/prune_at_init/snip_lenet300_mnist.yaml", []))
    assert [n.key for n in mine.nodes_by_round()[0]] == [n.key for n in snip.nodes_by_round()[0]]
    assert mine.rounds[1].mask.inputs["scores"].fields["criterion"] == "prospr"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_match_the_cpu():
    net, batches = MLP(), data()
    cpu = prospr(net, batches, meta_steps=2, lr=0.5)
    gpu = prospr(net.cuda(), [(x.cuda(), y.cuda()) for x, y in batches], meta_steps=2, lr=0.5)
    for n in cpu:
        torch.testing.assert_close(gpu[n].cpu(), cpu[n], rtol=1e-9, atol=1e-12)
