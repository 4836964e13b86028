"""Early-bird tickets: the stop rule on hand-made masks, the channel mask by hand, and the
paradigm end to end (the ticket is what retrains; a resumed search decides the same)."""
from __future__ import annotations

import torch
from torch import nn

from conftest import tiny_raw
from pai_core.data import load
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.paradigms.early_bird import EarlyBird, channel_keep, channel_weight_mask
from pai_core.spec_io import parse_spec
from pai_core.specs import TrainSpec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.training import Callback, TrainState, train


class Scripted(EarlyBird):
    """EarlyBird whose masks are given, so the rule itself is what is tested."""

    def __init__(self, flats, **cfg):
        super().__init__({"structure": "unstructured", "sparsity": 0.5, "l1": 0.0, **cfg}, total=100)
        self.flats = iter(flats)

    def draw(self, model):
        flat = torch.tensor(next(self.flats), dtype=torch.bool)
        return flat, {"w": flat}


def test_stop_rule_is_the_newest_mask_against_each_in_the_window():
    # 10 entries: one flip = distance 0.1. Window 3, epsilon 0.15.
    a = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    b = [1, 1, 1, 1, 0, 1, 0, 0, 0, 0]  # 2 flips from a: 0.2
    c = [1, 1, 1, 1, 0, 0, 1, 0, 0, 0]  # 2 from a, 2 from b
    d = [1, 1, 1, 1, 0, 0, 1, 0, 0, 0]  # = c: 0.2 from b (still in window) -> no stop
    e = [1, 1, 1, 1, 0, 0, 1, 0, 0, 0]  # = c = d: window (c, d, e) all 0 -> stop
    eb = Scripted([a, b, c, d, e], window=3, epsilon=0.15)
    state = TrainState(None, None, None, 0, 100, 100, 10)
    stopped_at = None
    for epoch in range(1, 6):
        state.it = 10 * epoch
        eb.on_epoch_end(state, {"epoch": float(epoch)})
        if state.stop:
            stopped_at = epoch
            break
    assert stopped_at == 5
    assert eb.distances == [0.2, 0.2, 0.0]
    assert eb.record()["stopped_early"]["saved"] == 0.5 and eb.record()["stopped_early"]["epoch"] == 5.0
    assert torch.equal(state.mask["w"], torch.tensor(e, dtype=torch.bool))


def test_channel_mask_by_hand():
    model = build_model("conv2", (1, 8, 8), 10, seed=0, width=0.0625, batch_norm=True)  # 4 channels per conv
    bn1, bn2 = model.features.bn1, model.features.bn2
    with torch.no_grad():
        bn1.weight.copy_(torch.tensor([0.9, -0.1, 0.5, 0.05]))
        bn2.weight.copy_(torch.tensor([0.2, 0.8, -0.7, 0.3]))
    keep = channel_keep(model, 0.5)  # 8 scales: keep the 4 largest |γ| (0.9, 0.8, 0.7, 0.5)
    assert keep["features.bn1"].tolist() == [True, False, True, False]
    assert keep["features.bn2"].tolist() == [False, True, True, False]
    quarter = channel_keep(model, 0.25)  # 6 kept: 0.3 and 0.2 join; 0.1 and 0.05 go
    assert quarter["features.bn1"].tolist() == [True, False, True, False] and quarter["features.bn2"].all()
    mask = channel_weight_mask(model, keep)
    w1, w2, fc1 = mask["features.conv1.weight"], mask["features.conv2.weight"], mask["fc1.weight"]
    assert w1.flatten(1).all(1).tolist() == [True, False, True, False] and not w1[1].any()
    assert w2.flatten(1).any(1).tolist() == [False, True, True, False]
    assert not w2[:, 1].any() and not w2[:, 3].any() and w2[1][[0, 2]].all()  # inputs from dropped conv1 filters
    per_channel = fc1.shape[1] // 4
    kept_inputs = fc1.reshape(fc1.shape[0], 4, per_channel).any(2).any(0)
    assert kept_inputs.tolist() == [False, True, True, False]


def test_early_bird_plan_retrains_the_ticket_and_stops_early(tmp_path):
    raw = tiny_raw("early_bird", train={"epochs": 8})
    raw["prune"] = {"sparsity": 0.8}
    raw["early_bird"] = {"structure": "unstructured", "window": 2, "epsilon": 0.2}
    spec = parse_spec(raw)
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    rnd = plan.rounds[1]
    search = refs[rnd.mask.key]
    found = search.info.stopped_early
    assert found["epoch"] is not None and search.info.iteration < 8 * 20
    assert found["saved"] == 1 - search.info.iteration / (8 * 20)
    ticket = rt.store.load(search)["mask"]
    assert abs(search.info.sparsity - 0.8) < 1e-3
    final = rt.store.load(refs[rnd.trained.key])["model"]
    for n, m in ticket.items():  # the retrained net is the ticket: pruned weights stay zero
        assert not final[n][~m].any()
    assert rnd.trained.inputs["start"] is rnd.mask, "retrains from the ticket's weights"
    assert refs[rnd.evaluate.key].info.sparsity == search.info.sparsity


class Crash(Callback):
    def after_backward(self, state):
        if state.it == 50:
            raise KeyboardInterrupt


def test_a_resumed_search_draws_the_same_ticket(tmp_path):
    data = load("synthetic")
    spec = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, epochs=8)
    cfg = {"structure": "unstructured", "sparsity": 0.8, "window": 3, "epsilon": 0.05, "l1": 0.0}

    def run(callbacks, ckpt=None):
        model = build_model("lenet_300_100", data.in_shape, 10, seed=0)
        out = train(model, data, spec, batch_size=50, order_seed=0, checkpoint=ckpt, callbacks=callbacks,
                    mask={n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()
                          if n.endswith("weight")})
        return model, out

    eb = EarlyBird(cfg, 160)
    full, out = run([eb])
    ckpt = tmp_path / "c.pt"
    try:
        run([EarlyBird(cfg, 160), Crash()], ckpt)
    except KeyboardInterrupt:
        pass
    eb2 = EarlyBird(cfg, 160)
    resumed, out2 = run([eb2], ckpt)
    assert eb2.distances == eb.distances and out2.iteration == out.iteration
    assert all(torch.equal(out.mask[n], out2.mask[n]) for n in out.mask)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))


def test_channel_search_adds_the_slimming_l1_subgradient():
    model = build_model("conv2", (1, 8, 8), 10, seed=0, width=0.0625, batch_norm=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    eb = EarlyBird({"structure": "channel", "sparsity": 0.5, "window": 5, "epsilon": 0.1, "l1": 0.01}, 10)
    eb.after_backward(TrainState(model, None, None, 0, 10, 10, 1))
    bn = model.features.bn1
    assert torch.equal(bn.weight.grad, 0.01 * torch.sign(bn.weight.detach()))
    assert not model.features.conv1.weight.grad.any(), "only BN scales are penalised"
    assert isinstance(bn, nn.BatchNorm2d)
