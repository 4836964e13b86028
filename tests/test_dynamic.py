"""SET and RigL as in the reference (google-research/rigl `sparse_optimizers.py`): exact
sparsity after every update, k = floor(f · active) grown among all the weights not kept,
new connections get the grow init with fresh optimizer state, a regrown just-dropped weight
keeps its value and state, and the plan evaluates with the final mask."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_spec
from pai_core.callbacks import MaskUpdate
from pai_core.data import load
from pai_core.dynamic import PAPER_DEFAULTS, DynamicSparsity
from pai_core.masks import dense_mask
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.selection import select
from pai_core.specs import TrainSpec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.training import train


def setup(opt_name):
    data = load("synthetic")
    model = build_model("lenet_300_100", data.in_shape, data.num_classes, seed=0)
    g = torch.Generator().manual_seed(0)
    mask = select({n: torch.rand(m.shape, generator=g) for n, m in dense_mask(model).items()}, dense_mask(model), 0.2)
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    for _ in range(2):  # build up optimizer state
        opt.zero_grad()
        F.cross_entropy(model(data.train.x[:50]), data.train.y[:50]).backward()
        opt.step()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in mask:
                p.mul_(mask[n])
    opt.zero_grad()
    F.cross_entropy(model(data.train.x[50:100]), data.train.y[50:100]).backward()
    return model, opt, mask


@pytest.mark.parametrize("method", ["set", "rigl"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_one_update(method, opt_name):
    model, opt, mask = setup(opt_name)
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in mask}
    grads = {n: params[n].grad.clone() for n in mask}
    upd = DynamicSparsity(method, 10, 0.3, 1000, seed=0)
    new = upd(10, model, opt, mask)
    total_k = 0
    for n, m in mask.items():
        assert int(new[n].sum()) == int(m.sum()), "exact count per layer"
        # Reference: k = floor(f · active) with f cosine (RigL) or constant (SET); the old
        # test expected k net flips, but a just-dropped weight may now be regrown, so the
        # k smallest |w| are dropped, then k grown among all the weights not kept.
        k = int(upd.fraction(10) * int(m.sum()))
        total_k += k
        active = m.reshape(-1).nonzero().squeeze(1)
        drop = active[torch.sort(before[n].reshape(-1)[active].abs(), stable=True).indices[:k]]
        kept = m.clone().reshape(-1)
        kept[drop] = False
        kept = kept.reshape(m.shape)
        assert torch.all(new[n][kept]) and int((new[n] & ~kept).sum()) == k
        dropped, grown = m & ~new[n], new[n] & ~m
        assert int(dropped.sum()) == int(grown.sum()) <= k
        assert torch.all(params[n].detach()[dropped] == 0)
        regrown = m & new[n] & ~kept  # dropped, regrown: keeps its value (and state)
        assert torch.equal(params[n].detach()[regrown], before[n][regrown])
        if upd.grow_init == "zero":
            assert torch.all(params[n].detach()[grown] == 0)
        else:
            assert torch.all(params[n].detach()[grown] != 0)
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            buf = opt.state[params[n]].get(key)
            if buf is not None:
                assert torch.all(buf[grown] == 0)
        if method == "rigl":  # grown = the k largest |dense gradient| among the weights not kept
            assert grads[n][grown].abs().min() >= grads[n][~m & ~grown].abs().max()
            chosen = new[n] & ~kept
            assert grads[n][chosen].abs().min() >= grads[n][~kept & ~chosen].abs().max()
    assert upd.updates[-1]["moved"] == total_k


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_training_keeps_sparsity_and_moves_the_mask(method):
    data = load("synthetic")
    model, _, mask = setup("sgd")
    upd = DynamicSparsity(method, 5, 0.3, 60, seed=0)
    out = train(model, data, TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, epochs=4), batch_size=50,
                order_seed=0, mask=mask, callbacks=[MaskUpdate(upd)])
    assert len(upd.updates) == 11 and all(u["moved"] > 0 for u in upd.updates)
    params = dict(model.named_parameters())
    for n, m in out.mask.items():
        assert int(m.sum()) == int(mask[n].sum())
        assert torch.count_nonzero(params[n].detach()[~m]) == 0
    assert any(not torch.equal(out.mask[n], mask[n]) for n in mask)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_dynamic_plan_evaluates_with_the_final_mask(tmp_path, method):
    spec = tiny_spec("dynamic_sparse", dynamic={"method": method, "update_interval": 5},
                     prune={"criterion": "random", "schedule": "one_shot", "sparsity": 0.9, "rate": None,
                            "rounds": 1, "scope": "erk"})
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    trained = rt.store.load(refs[plan.rounds[1].trained.key])
    start = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    assert any(not torch.equal(trained["mask"][n], start[n]) for n in start)
    ev = refs[plan.rounds[1].evaluate.key].info
    assert ev.sparsity == pytest.approx(0.9, abs=2e-3) and ev.test_acc > 0.2  # chance is 0.1


def tiny(weights, grads, active, momentum):
    """One 2x4 layer, SGD with a known momentum buffer."""
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    p = model[0].weight
    with torch.no_grad():
        p.copy_(torch.tensor(weights).reshape(2, 4))
    p.grad = torch.tensor(grads).reshape(2, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.state[p]["momentum_buffer"] = torch.tensor(momentum).reshape(2, 4)
    return model, opt, {"0.weight": torch.tensor(active).reshape(2, 4)}


@pytest.mark.parametrize("regrow", [True, False])
def test_just_dropped_weight_with_the_largest_gradient(regrow):
    # active: 0..3; k = floor(0.5 · 4) = 2 drops w0 = 0.01 and w3 = 0.02; w0 has the largest |grad|.
    w = [0.01, 0.5, 0.6, 0.02, 0, 0, 0, 0]
    g = [9.0, 0.0, 0.0, 0.0, 1.0, 3.0, 2.0, 0.5]
    model, opt, mask = tiny(w, g, [True] * 4 + [False] * 4, [float(i + 1) for i in range(8)])
    upd = DynamicSparsity("rigl", 10, 0.5, 100, 0, anneal="constant", regrow_dropped=regrow)
    new = upd(10, model, opt, mask)["0.weight"].reshape(-1)
    p, buf = model[0].weight.detach().reshape(-1), opt.state[model[0].weight]["momentum_buffer"].reshape(-1)
    if regrow:  # reference: grown = w0 (regrown) and w5; w0 keeps its value and its momentum
        assert new.tolist() == [True, True, True, False, False, True, False, False]
        assert p[0] == 0.01 and buf[0] == 1.0
        assert upd.updates[-1]["regrown"] == 1
    else:  # old behaviour: only the weights inactive before are candidates
        assert new.tolist() == [False, True, True, False, False, True, True, False]
        assert p[0] == 0 and upd.updates[-1]["regrown"] == 0
    assert p[3] == 0 and p[5] == 0 and buf[5] == 0 and int(new.sum()) == 4


def test_k_is_a_floor_of_the_active_count_and_not_capped():
    # 7 active, 1 inactive: k = floor(0.35 · 7) = 2 > 1 inactive, so the old cap (k = 1) would bind.
    w = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0]
    g = [1.0, 5.0, 0, 0, 0, 0, 0, 3.0]
    for regrow, moved in ((True, 2), (False, 1)):
        model, opt, mask = tiny(w, g, [True] * 7 + [False], [0.0] * 8)
        upd = DynamicSparsity("rigl", 10, 0.35, 100, 0, anneal="constant", regrow_dropped=regrow)
        new = upd(10, model, opt, mask)["0.weight"]
        assert upd.updates[-1]["moved"] == moved and int(new.sum()) == 7
    model, opt, mask = tiny(w, g, [True] * 7 + [False], [0.0] * 8)
    upd = DynamicSparsity("rigl", 10, 0.4, 100, 0, anneal="constant")
    upd(10, model, opt, mask)  # 0.4 · 7 = 2.8: floor 2, not round 3
    assert upd.updates[-1]["moved"] == 2


@pytest.mark.parametrize("method", ["set", "rigl"])
@pytest.mark.parametrize("regrow", [True, False])
def test_counts_stay_exact_over_many_updates(method, regrow):
    model, opt, mask = setup("sgd")
    data = load("synthetic")
    upd = DynamicSparsity(method, 5, 0.5, 100, 1, regrow_dropped=regrow)
    current = mask
    for it in range(5, 100, 5):
        opt.zero_grad()
        F.cross_entropy(model(data.train.x[:50]), data.train.y[:50]).backward()
        current = upd(it, model, opt, current)
        params = dict(model.named_parameters())
        for n, m in current.items():
            assert int(m.sum()) == int(mask[n].sum()) and m.device.type == "cpu"
            assert torch.count_nonzero(params[n].detach()[~m]) == 0
    assert len(upd.updates) == 19


def test_anneal_and_paper_defaults():
    s, r = DynamicSparsity("set", 10, 0.3, 1000, 0), DynamicSparsity("rigl", 10, 0.3, 1000, 0)
    assert (s.anneal, s.grow_init, s.regrow_dropped, s.skip_step_on_update) == ("constant", "random", True, False)
    assert (r.anneal, r.grow_init, r.regrow_dropped, r.skip_step_on_update) == ("cosine", "zero", True, True)
    assert all(s.fraction(it) == 0.3 for it in (0, 10, 500, 990))
    assert r.fraction(0) == pytest.approx(0.3) and r.fraction(500) == pytest.approx(0.15)
    assert r.fraction(1000) == pytest.approx(0.0, abs=1e-12)
    assert DynamicSparsity("rigl", 10, 0.3, 1000, 0, anneal="constant").fraction(500) == 0.3
    assert DynamicSparsity("set", 10, 0.3, 1000, 0, anneal="cosine").fraction(500) == pytest.approx(0.15)
    assert not DynamicSparsity("rigl", 10, 0.3, 1000, 0, skip_step_on_update=False).skip_step_on_update
    assert DynamicSparsity.paper_defaults("set") == PAPER_DEFAULTS["set"]
    assert DynamicSparsity.paper_defaults("rigl") is not PAPER_DEFAULTS["rigl"]  # a copy
    with pytest.raises(ValueError):
        DynamicSparsity.paper_defaults("snfs")
    with pytest.raises(ValueError):
        DynamicSparsity("set", 10, 0.3, 1000, 0, grow_init="ones")


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_random_grow_init_is_seeded_and_drawn_at_the_masked_layer_std(method):
    """RigL's `random_normal`: the std of the whole masked layer, zeros included (not the active
    weights' alone, which compounded update after update and made SET diverge)."""
    def run(seed, it):
        model, opt, mask = setup("sgd")
        params = dict(model.named_parameters())
        std = {n: (params[n].detach() * mask[n]).std(unbiased=False).item() for n in mask}
        new = DynamicSparsity(method, 10, 0.3, 1000, seed, grow_init="random")(it, model, opt, mask)
        grown = {n: params[n].detach()[new[n] & ~mask[n]].clone() for n in mask}
        return new, grown, std

    new_a, grown_a, std = run(3, 10)
    new_b, grown_b, _ = run(3, 10)
    _, grown_c, _ = run(4, 10)
    _, grown_d, _ = run(3, 20)
    for n in new_a:
        assert torch.equal(new_a[n], new_b[n]) and torch.equal(grown_a[n], grown_b[n])
        assert torch.all(grown_a[n] != 0)
    big = max(grown_a, key=lambda n: grown_a[n].numel())  # ~14k draws: the std is within a few %
    assert grown_a[big].std().item() == pytest.approx(std[big], rel=0.1)
    assert abs(grown_a[big].mean().item()) < 0.1 * std[big]
    assert not torch.equal(grown_a[big], grown_c[big]) and not torch.equal(grown_a[big], grown_d[big])
