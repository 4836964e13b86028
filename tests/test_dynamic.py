"""SET and RigL: exact sparsity after every update, grown weights start at zero with fresh
optimizer state, and the plan evaluates with the final mask."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_spec
from pai_core.data import load
from pai_core.dynamic import DynamicSparsity
from pai_core.masks import dense_mask
from pai_core.models import build_model
from pai_core.plan import build_plan
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
    for n, m in mask.items():
        assert int(new[n].sum()) == int(m.sum()), "exact count per layer"
        dropped, grown = m & ~new[n], new[n] & ~m
        k = int(0.3 / 2 * (1 + torch.cos(torch.tensor(torch.pi * 10 / 1000))) * int(m.sum()))
        assert int(dropped.sum()) == int(grown.sum()) == k
        # dropped = the k smallest |w| among the active
        assert before[n][dropped].abs().max() <= before[n][m & new[n]].abs().min()
        assert torch.all(params[n].detach()[grown] == 0)
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            buf = opt.state[params[n]].get(key)
            if buf is not None:
                assert torch.all(buf[grown] == 0)
        if method == "rigl":  # grown = the k largest |dense gradient| among the inactive
            assert grads[n][grown].abs().min() >= grads[n][~m & ~grown].abs().max()


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_training_keeps_sparsity_and_moves_the_mask(method):
    data = load("synthetic")
    model, _, mask = setup("sgd")
    upd = DynamicSparsity(method, 5, 0.3, 60, seed=0)
    out = train(model, data, TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, epochs=4), batch_size=50,
                order_seed=0, mask=mask, mask_updater=upd)
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
    assert ev["sparsity"] == pytest.approx(0.9, abs=2e-3) and ev["test_acc"] > 0.2  # chance is 0.1
