"""SR-STE (pai_core/dynamic_methods/sr_ste.py): N:M masks exact at every step and chosen as
select_nm chooses them, two SGD steps against a hand computation (straight-through gradient, the
sparse-refined decay on the removed weights only, momentum that belongs to θ), the training's
optimizer leaving the masked weights to θ, the decay lowering the flip rate, bit-exact resume,
the spec's N:M rules by name, and the plan storing a 2:4 net."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, crash_and_resume, random_sparse_start, tiny_raw
from pai_core.catalog import catalog
from pai_core.dynamic_methods import dynamic_method_names, get_method
from pai_core.dynamic_methods.sr_ste import SRSTE, SRSTEParams, nm_top
from pai_core.dynamic_methods.tools import InTimeOverparam
from pai_core.paradigms import build_plan
from pai_core.selection import select_nm
from pai_core.spec_io import SpecError, load_spec, parse_spec
from pai_core.specs import TrainSpec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.training import Callback, TrainState, train


def nm_raw(method: str = "sr_ste", params: dict | None = None, **prune) -> dict:
    raw = tiny_raw("dynamic_sparse", dynamic={"method": method, **({"params": params} if params is not None else {})})
    raw["prune"] = {"criterion": "magnitude", "schedule": "one_shot", "structure": "nm", "n": 2, "m": 4, **prune}
    return raw


def test_sr_ste_is_registered_listed_and_offered_by_the_form():
    from pai_core.paradigms.dynamic_sparse import DynamicSpec

    assert "sr_ste" in dynamic_method_names() and get_method("sr_ste").label == "SR-STE"
    assert get_method("sr_ste").keeps_nm and not any(get_method(n).keeps_nm for n in dynamic_method_names()
                                                     if n != "sr_ste")
    listed = {name: what for kind, name, what in catalog() if kind.startswith("dynamic method")}
    assert "Zhou" in listed["sr_ste"] and "decay" in listed["sr_ste"]
    assert "sr_ste" in DynamicSpec.model_json_schema()["properties"]["method"]["enum"]


def test_the_spec_hands_n_and_m_to_the_training_and_other_methods_refuse_nm_by_name():
    plan = build_plan(parse_spec(nm_raw(n=1, m=4)))
    assert plan.rounds[1].trained.fields["dynamic"] == {
        "method": "sr_ste", "params": {"decay": 0.0002, "update_interval": 1}, "nm": [1, 4]}
    channels = build_plan(parse_spec(nm_raw(n=1, m=4, nm_groups="channels")))
    assert channels.rounds[1].trained.fields["dynamic"]["nm"] == [1, 4, "channels"]
    assert get_method("sr_ste").build(channels.rounds[1].trained.fields["dynamic"], 10, 0).nm == (1, 4, "channels")
    assert plan.rounds[1].density == 0.25
    unstructured = build_plan(parse_spec(tiny_raw("dynamic_sparse", dynamic={"method": "sr_ste"}, prune={
        "criterion": "random", "schedule": "one_shot", "sparsity": 0.9, "rate": None, "rounds": 1, "scope": "erk"})))
    assert "nm" not in unstructured.rounds[1].trained.fields["dynamic"]  # per-layer top-k at the start counts
    for method in ("topkast", "mest"):
        with pytest.raises(SpecError) as e:
            parse_spec(nm_raw(method))
        assert str(e.value).startswith(f"prune.structure: dynamic_sparse cannot keep an N:M pattern with {method}: ")
        assert "sr_ste learns N:M masks" in str(e.value) and str(e.value).endswith("allowed: unstructured")


@pytest.mark.parametrize("params, says", [
    ({"decay": -1e-4}, "dynamic.params.decay: Input should be greater than or equal to 0"),
    ({"update_interval": 0}, "dynamic.params.update_interval: Input should be greater than or equal to 1"),
    ({"update_interval": 10**6}, "dynamic.params.update_interval: the mask would never be chosen again"),
    ({"penalty": 0.1}, "dynamic.params.penalty: unknown field; allowed: decay, update_interval"),
])
def test_a_bad_param_is_refused_naming_its_field(params, says):
    with pytest.raises(SpecError) as e:
        parse_spec(nm_raw(params=params))
    assert str(e.value).startswith(says), str(e.value)


def test_nm_top_is_select_nm_on_the_device_ties_and_all():
    v = torch.tensor([[0.5, -0.9, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0]])
    assert nm_top(v, 2, 4).tolist() == [[True, True, False, False, True, True, False, False]]  # ties: lower index
    g = torch.Generator().manual_seed(0)
    for shape, n, m, groups in [((6, 8), 2, 4, "rows"), ((5, 3, 2, 2), 1, 4, "rows"), ((4, 16), 3, 8, "rows"),
                                ((3, 12), 1, 2, "rows"), ((3, 8, 3, 3), 2, 4, "channels"), ((4, 8), 1, 4, "channels")]:
        for _ in range(20):
            v = torch.randint(-3, 4, shape, generator=g).float()  # many ties
            want = select_nm({"w": v.abs()}, {"w": torch.ones(shape, dtype=torch.bool)}, n, m, groups=groups)["w"]
            got = nm_top(v, n, m, groups)
            assert torch.equal(got, want) and int(got.sum()) == v.numel() * n // m


def tiny(weights: list[float]) -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(weights).reshape(2, 8))
    return model


def test_two_sgd_steps_by_hand():
    """A 2 × 8 layer at 2:4, SGD with momentum 0.9 and weight decay 0.01, λ_W = 0.1. Each step:
    the gradient at θ ⊙ E for every weight, plus λ_W·θ where E is off, plus the decay; momentum
    over θ; E again from |θ|; the model holds θ ⊙ E, and the training's optimizer moves nothing."""
    w0 = torch.tensor([0.9, -0.05, 0.3, -0.8, 0.02, 0.31, -0.29, 0.01,
                       0.2, 0.25, -0.21, 0.1, -0.6, 0.05, 0.4, 0.3])
    start = {"0.weight": torch.ones(2, 8, dtype=torch.bool)}  # only its structure matters: E(θ₀) replaces it
    xs = [torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.0, 2.0, 0.5, -0.5]]), torch.tensor([[-1.0, 1.0, 2.0, -3.0, 0.5, 1.0,
                                                                                    -2.0, 1.5]])]
    ys = [torch.tensor([1]), torch.tensor([0])]
    lr, mu, wd, lam = 0.5, 0.9, 0.01, 0.1
    model = tiny(w0.tolist())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mu, weight_decay=wd)
    cb = SRSTE(SRSTEParams(decay=lam), total=10, nm=(2, 4))
    state = TrainState(model, opt, dict(start), 0, 10, 10, 10)
    cb.before_masking(state)
    cb.on_start(state)

    theta, buf = w0.clone(), None
    for step, (x, y) in enumerate(zip(xs, ys)):
        e = nm_top(theta.reshape(2, 8), 2, 4).reshape(-1)
        assert torch.equal(state.mask["0.weight"].reshape(-1), e)
        assert torch.equal(model[0].weight.detach().reshape(-1), theta * e)
        sparse = (theta * e).reshape(2, 8).requires_grad_(True)
        F.cross_entropy(x @ sparse.t(), y).backward()
        d = sparse.grad.reshape(-1) + lam * theta * ~e + wd * theta  # STE + sparse-refined + weight decay
        buf = d if buf is None else mu * buf + d
        theta = theta - lr * buf

        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        cb.after_backward(state)
        assert model[0].weight.grad is None  # the training's optimizer leaves the weight to θ
        opt.step()
        state.it = step + 1
        cb.on_step_end(state)
        assert torch.allclose(cb.theta["0.weight"].reshape(-1), theta, atol=1e-6)
    assert not opt.state  # it never stepped the masked weight


class NMExact(Callback):
    """After every step: every group of 4 keeps exactly 2, the weights outside the mask are zero,
    and the mask is 2:4 of the model's own nonzero weights' magnitudes."""

    def __init__(self):
        self.steps, self.first = 0, None

    def on_start(self, state):
        self.first = {n: m.clone() for n, m in state.mask.items()}

    def on_step_end(self, state):
        params = dict(state.model.named_parameters())
        for n, m in state.mask.items():
            assert (m.reshape(-1, 4).sum(1) == 2).all()
            assert not params[n].detach()[~m].any()
        self.steps += 1


SGD = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, epochs=3)


def test_training_keeps_2_4_exact_moves_the_mask_and_learns():
    data, model, mask = random_sparse_start(0, 1.0)
    mask = {n: torch.ones_like(m) for n, m in mask.items()}
    check = NMExact()
    cb = InTimeOverparam(SRSTE(SRSTEParams(), 60, (2, 4)))
    out = train(model, data, SGD, batch_size=50, order_seed=0, mask=mask, callbacks=[cb, check])
    assert check.steps == 60 and out.history[-1]["test_acc"] > 0.2  # chance: 0.1
    assert any(not torch.equal(out.mask[n], check.first[n]) for n in mask)  # E moved
    final = {n: p.detach() for n, p in model.named_parameters() if n in mask}
    rec = cb.record()
    assert [u["iteration"] for u in rec["mask_updates"]] == [20, 40, 60]
    assert all(0 < u["flip_rate"] < 0.5 for u in rec["mask_updates"]) and rec["itop_rate"] > 0.5
    for n, m in out.mask.items():  # the stored mask keeps exactly the nonzero weights
        assert torch.equal(m, final[n] != 0)


def test_the_decay_settles_the_mask():
    """The paper's point: λ_W pulls the removed weights away from the threshold, so fewer flip."""
    rates = {}
    for lam in (0.0, 0.05):
        data, model, mask = random_sparse_start(0, 1.0)
        cb = SRSTE(SRSTEParams(decay=lam), 60, (2, 4))
        train(model, data, SGD, batch_size=50, order_seed=0, mask={n: torch.ones_like(m) for n, m in mask.items()},
              callbacks=[cb])
        rates[lam] = sum(u["flipped"] for u in cb.updates)
    assert rates[0.05] < 0.8 * rates[0.0], rates


def test_unstructured_keeps_each_layers_start_count():
    data, model, mask = random_sparse_start(0, 0.1)
    counts = {n: int(m.sum()) for n, m in mask.items()}
    out = train(model, data, SGD, batch_size=50, order_seed=0, mask=mask,
                callbacks=[SRSTE(SRSTEParams(update_interval=3), 60, None)])
    assert {n: int(m.sum()) for n, m in out.mask.items()} == counts


@pytest.mark.parametrize("interval, optimizer, nm", [(1, "sgd", (2, 4)), (7, "sgd", (2, 4)), (1, "adam", (2, 4)),
                                                     (7, "adam", (2, 4)), (3, "sgd", (2, 8))])
def test_a_resumed_training_equals_an_uninterrupted_one_bit_for_bit(interval, optimizer, nm, tmp_path):
    """(2, 8): the layers with rows of 300 and 100, which m does not divide, stay dense and are not
    SR-STE's; the first (256) is 2:8."""
    spec = SGD if optimizer == "sgd" else TrainSpec(optimizer="adam", lr=1e-3, epochs=3)

    def start():
        data, model, mask = random_sparse_start(0, 1.0)
        return data, model, {n: torch.ones_like(m) for n, m in mask.items()}
    r = crash_and_resume(start, lambda: InTimeOverparam(SRSTE(SRSTEParams(update_interval=interval), 60, nm)), spec,
                         tmp_path)
    assert r["checkpointed"] == 40
    assert all(torch.equal(a, b) for a, b in zip(r["full"].state_dict().values(), r["resumed"].state_dict().values()))
    assert all(torch.equal(r["out"].mask[n], r["out2"].mask[n]) for n in r["mask"])
    assert r["again"].record() == r["whole"].record()
    if nm == (2, 8):
        assert set(r["whole"].inner.theta) == {"fc1.weight"} and r["out"].mask["fc2.weight"].all()


def test_the_plan_stores_a_2_4_net(tmp_path):
    spec = parse_spec(nm_raw(params={"update_interval": 2}))
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    trained = rt.store.load(refs[plan.rounds[1].trained.key])
    for n, m in trained["mask"].items():
        assert (m.reshape(-1, 4).sum(1) == 2).all(), n
        assert not trained["model"][n][~m].any(), n
    ev = refs[plan.rounds[1].evaluate.key].info
    assert ev.sparsity == pytest.approx(0.5) and ev.test_acc > 0.2
    assert refs[plan.rounds[1].trained.key].info.mask_updates


def test_on_a_conv_net_the_mask_keeps_channel_groups(tmp_path):
    raw = nm_raw(params={"update_interval": 3}, nm_groups="channels", nm_indivisible="dense")
    raw["model"], raw["train"]["epochs"] = {"name": "conv2", "width": 0.25}, 1
    plan = build_plan(parse_spec(raw))
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    trained = rt.store.load(refs[plan.rounds[1].trained.key])
    start = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    conv = trained["mask"]["features.conv2.weight"]  # 8 input channels at width 0.25
    assert (conv.permute(0, 2, 3, 1).reshape(-1, 4).sum(1) == 2).all()
    assert not torch.equal(conv, start["features.conv2.weight"])  # it moved, in channel groups
    assert trained["mask"]["features.conv1.weight"].all()  # 1 input channel: left dense


def test_the_config_is_valid_and_starts_from_the_shared_dense_round():
    ours = build_plan(load_spec(ROOT / "configs" / "dynamic" / "sr_ste_lenet300_mnist.yaml")).nodes
    rigl = build_plan(load_spec(ROOT / "configs" / "dynamic" / "rigl_lenet300_mnist.yaml")).nodes
    assert [n.key for n in ours[:3]] == [n.key for n in rigl[:3]]  # init, pretrain, evaluate
    assert ours[5].fields["dynamic"]["nm"] == [2, 4]


def test_results_name_the_method_its_ablation_and_the_n_m():
    from pai_core.paradigms.registry import get_paradigm

    def name(**kw):
        spec = parse_spec(nm_raw(**kw))
        return get_paradigm("dynamic_sparse").label(spec, build_plan(spec).rounds[1])
    assert name() == "SR-STE 2:4" and name(n=1, m=8, nm_indivisible="dense") == "SR-STE 1:8"
    assert name(params={"decay": 0.0}) == "STE 2:4"  # the paper's baseline: no sparse-refined term
    assert name(nm_groups="channels") == "SR-STE 2:4 by channel"
