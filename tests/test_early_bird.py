"""Early-bird tickets: the stop rule on hand-made masks, the channel mask by hand, and the
paradigm end to end (the ticket is what retrains; a resumed search decides the same). Channel
tickets on residual nets: whole channel families go, the kept count is the stated one, the
masked net is the physically smaller one; chain nets draw the masks and keep the keys they had."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_raw
from pai_core import channel_graph, structured
from pai_core.data import load
from pai_core.masks import apply_mask
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.paradigms.early_bird import EarlyBird, channel_families, channel_keep, channel_weight_mask
from pai_core.spec_io import SpecError, load_spec, parse_spec
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
    families = channel_families(model)
    assert list(families) == ["features.conv1", "features.conv2"]  # the fc layers have no BatchNorm
    keep = channel_keep(model, families, 0.5)  # 8 scales: keep the 4 largest |γ| (0.9, 0.8, 0.7, 0.5)
    assert keep["features.conv1"].tolist() == [True, False, True, False]
    assert keep["features.conv2"].tolist() == [False, True, True, False]
    quarter = channel_keep(model, families, 0.25)  # 6 kept: 0.3 and 0.2 join; 0.1 and 0.05 go
    assert quarter["features.conv1"].tolist() == [True, False, True, False] and quarter["features.conv2"].all()
    mask = channel_weight_mask(model, keep)
    w1, w2, fc1 = mask["features.conv1.weight"], mask["features.conv2.weight"], mask["fc1.weight"]
    assert w1.flatten(1).all(1).tolist() == [True, False, True, False] and not w1[1].any()
    assert w2.flatten(1).any(1).tolist() == [False, True, True, False]
    assert not w2[:, 1].any() and not w2[:, 3].any() and w2[1][[0, 2]].all()  # inputs from dropped conv1 filters
    per_channel = fc1.shape[1] // 4
    kept_inputs = fc1.reshape(fc1.shape[0], 4, per_channel).any(2).any(0)
    assert kept_inputs.tolist() == [False, True, True, False]


def test_a_layer_the_ranking_would_empty_keeps_its_best_channel():
    model = build_model("conv2", (1, 8, 8), 10, seed=0, width=0.0625, batch_norm=True)
    with torch.no_grad():
        model.features.bn1.weight.copy_(torch.tensor([0.9, 0.8, 0.7, 0.6]))
        model.features.bn2.weight.copy_(torch.tensor([0.1, 0.3, 0.2, 0.1]))
    keep = channel_keep(model, channel_families(model), 0.5)  # by rank alone: bn1's 4; bn2's best (0.3) first
    assert keep["features.conv2"].tolist() == [False, True, False, False]
    assert keep["features.conv1"].tolist() == [True, True, True, False]  # the 0.6 makes room
    assert _today_channel_keep(model, 0.5)["features.bn2"].sum() == 0  # what the chain-only code drew


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


# ------------------------------------------------------------ chain nets: masks and keys as before

def _today_channel_keep(model, sparsity):
    """The chain-only channel_keep of this paradigm before residual nets (git f7bef59): every
    BatchNorm channel in module order, all but int(n · sparsity) by |γ|, no per-layer floor."""
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, structured.BN)]
    scales = torch.cat([m.weight.detach().abs().cpu() for _, m in bns])
    order = torch.sort(scales, descending=True, stable=True).indices
    flat = torch.zeros(len(scales), dtype=torch.bool)
    flat[order[:len(scales) - int(len(scales) * sparsity)]] = True
    out, at = {}, 0
    for n, m in bns:
        out[n], at = flat[at:at + m.weight.numel()], at + m.weight.numel()
    return out


def _today_channel_weight_mask(model, keep_bn):
    """Its weight mask: the BN's layer (bn_after) loses the dropped filters, chain layers only."""
    layer_of = {bn: layer for layer, bn in structured.bn_after(model).items()}
    keep = {n: torch.ones(m.weight.shape[0], dtype=torch.bool) for n, m in structured.chain(model)[:-1]}
    for bn, k in keep_bn.items():
        if layer_of.get(bn) in keep:
            keep[layer_of[bn]] = k
    return structured.filter_mask(model, keep)


CHAINS = [("conv2", (1, 16, 16), {"width": 0.125, "batch_norm": True}),
          ("conv4", (1, 16, 16), {"width": 0.125, "batch_norm": True}),
          ("conv6", (3, 32, 32), {"width": 0.125, "batch_norm": True}),
          ("vgg11", (3, 32, 32), {"width": 0.125}), ("vgg16", (3, 32, 32), {"width": 0.125}),
          ("vgg19", (3, 32, 32), {"width": 0.125})]


@pytest.mark.parametrize("name,shape,params", CHAINS, ids=[c[0] for c in CHAINS])
def test_chain_nets_draw_the_masks_they_drew_before(name, shape, params):
    model = build_model(name, shape, 10, seed=0, **params)
    bns = [m for m in model.modules() if isinstance(m, structured.BN)]
    graph = channel_graph.trace(model)
    families, bn_of = channel_families(model, graph=graph), structured.bn_after(model)
    assert sum(len(gs) for gs in families.values()) == sum(m.num_features for m in bns)
    assert channel_families(model, "batch_norm", graph).keys() == families.keys()  # the same on a chain net
    g, checked = torch.Generator().manual_seed(0), 0
    for _ in range(3):
        with torch.no_grad():  # few distinct |γ|: many ties, both break them to the lower index
            for m in bns:
                m.weight.copy_(torch.randint(-4, 5, (m.num_features,), generator=g) / 4)
        for sparsity in (0.3, 0.5, 0.7):
            old = _today_channel_keep(model, sparsity)
            if not all(k.any() for k in old.values()):
                continue  # it emptied a layer: test_a_layer_the_ranking_would_empty_keeps_its_best_channel
            new = channel_keep(model, families, sparsity)
            assert {bn_of[f]: k.tolist() for f, k in new.items()} == {n: k.tolist() for n, k in old.items()}
            old_mask, new_mask = _today_channel_weight_mask(model, old), channel_weight_mask(model, new, graph)
            assert old_mask.keys() == new_mask.keys()
            assert all(torch.equal(old_mask[n], new_mask[n]) for n in old_mask)
            eb = EarlyBird({"structure": "channel", "sparsity": sparsity, "window": 2, "epsilon": 0.1, "l1": 0.0}, 10)
            flat, drawn = eb.draw(model)  # the callback's vector: the one the chain-only code compared
            assert torch.equal(flat, torch.cat([old[n] for n in sorted(old)]))
            assert all(torch.equal(old_mask[n], drawn[n]) for n in old_mask)
            checked += 1
    assert checked >= 5


ROOT = Path(__file__).resolve().parents[1]
PINNED = {  # every stage key, computed before residual nets were supported (git f7bef59)
    "early_bird/conv2_fashion.yaml": {
        ("dense", "init"): "4de04befb9356b637326", ("dense", "pretrain"): "da378f719e6a98ca7c50",
        ("dense", "evaluate"): "29adccfb0aa206ea57c4", ("early-bird", "eb_search"): "f671ce611907b0eaa727",
        ("early-bird", "retrain"): "b4dc52c18573fa8bf126", ("early-bird", "evaluate"): "b494cb13a3b28418c7c0"},
    "early_bird/lenet300_mnist.yaml": {
        ("dense", "init"): "8cc42ad981beb3a24757", ("dense", "pretrain"): "57d5dc76798b957cc191",
        ("dense", "evaluate"): "a92fc5aca01c641c4e98", ("early-bird", "eb_search"): "88f567d09c3010e71b65",
        ("early-bird", "retrain"): "b0ef91fa2425af588f75", ("early-bird", "evaluate"): "6109a3adc85361f67237"},
}


def _keys(path, *overrides):
    plan = build_plan(load_spec(ROOT / "configs" / path, list(overrides)))
    return {(r.name, n.role): n.key for r, nodes in zip(plan.rounds, plan.nodes_by_round()) for n in nodes}


@pytest.mark.parametrize("config", sorted(PINNED))
def test_existing_configs_keep_their_keys(config):
    assert _keys(config) == PINNED[config]


def test_the_resnet_config_shares_pats_dense_round_and_keys_only_what_it_sets():
    eb, pat = _keys("early_bird/resnet20_fashion.yaml"), _keys("pat/structured_resnet20_fashion.yaml")
    assert all(eb[("dense", r)] == pat[("dense", r)] for r in ("init", "pretrain", "evaluate"))
    other = _keys("early_bird/resnet20_fashion.yaml", "early_bird.filter_layers=batch_norm")
    assert other[("early-bird", "eb_search")] != eb[("early-bird", "eb_search")]
    plain = _keys("early_bird/resnet20_fashion.yaml", "prune.physical=false")
    assert plain[("early-bird", "eb_search")] == eb[("early-bird", "eb_search")]
    assert plain[("early-bird", "evaluate")] != eb[("early-bird", "evaluate")]
    spec = load_spec(ROOT / "configs/early_bird/resnet20_fashion.yaml")
    assert build_plan(spec).rounds[1].evaluate.fields["physical"] is True


# ------------------------------------------------------------------- residual nets (ResNet-20)

def _resnet(shortcut="A"):
    """ResNet-20 at a quarter width (4-8-16 channels) with random BatchNorm scales and statistics."""
    model = build_model("resnet20", (1, 16, 16), 10, seed=0, width=0.25, shortcut=shortcut)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _set_gamma(model, values):
    with torch.no_grad():
        for name, v in values.items():
            model.get_submodule(name).weight.copy_(torch.as_tensor(v, dtype=torch.float32))


def test_resnet_candidates_are_the_blocks_inner_channels_unless_the_stream_is_asked_for():
    model = _resnet()
    inner = channel_families(model)
    blocks = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert list(inner) == blocks and [len(inner[f]) for f in blocks] == [4] * 3 + [8] * 3 + [16] * 3
    every = channel_families(model, "batch_norm")
    assert set(every) == set(blocks) | {"conv1", "layer2.0.conv2", "layer3.0.conv2"}  # option A's three streams
    assert len(every["conv1"][0].layers) == 10  # stage 1's channel c: the stem and all nine blocks' conv2


def test_mobilenets_expanded_channels_are_unshared_and_its_residual_streams_are_not():
    from pai_core.models import model_info

    with torch.device("meta"):
        model = model_info("mobilenet_v2").construct((3, 32, 32), 10, {})
    graph = channel_graph.trace(model)
    inner, every = channel_families(model, graph=graph), channel_families(model, "batch_norm", graph)
    expand = inner["features.2.conv.0.0"]  # 16 -> 96 channels, then the depthwise conv of the same 96
    assert len(expand) == 96 and expand[0].layers == ("features.2.conv.0.0", "features.2.conv.1.0")
    # the five streams that residual adds tie (24, 32, 64, 96 and 160 channels), one projection per block
    assert set(every) - set(inner) == {f"features.{i}.conv.2" for i in (2, 4, 7, 11, 14)}
    assert [len(every[f"features.{i}.conv.2"][0].layers) for i in (2, 4, 7, 11, 14)] == [2, 3, 4, 3, 3]


@pytest.mark.parametrize("sparsity,kept", [(0.1, 76), (0.3, 59), (0.5, 42), (0.77, 20)])
def test_resnet_keeps_exactly_the_stated_fraction_of_the_candidates(sparsity, kept):
    model = _resnet()
    keep = channel_keep(model, channel_families(model), sparsity)  # 84 = 3·4 + 3·8 + 3·16 inner channels
    assert sum(int(k.sum()) for k in keep.values()) == kept and all(k.any() for k in keep.values())


@pytest.mark.parametrize("layers", ["unshared", "batch_norm"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_a_dropped_group_removes_every_filter_and_input_of_its_family(shortcut, layers):
    model = _resnet(shortcut)
    graph = channel_graph.trace(model)
    families = channel_families(model, layers, graph)
    stream = "conv1"
    if layers == "batch_norm":  # stage 1's stream channel 1 is weak in every layer that writes it: it goes
        for layer, c in families[stream][1].producers:
            model.get_submodule(structured.bn_after(model)[layer]).weight.data[c] = 1e-4
    keep = channel_keep(model, families, 0.3)
    mask = channel_weight_mask(model, keep, graph)
    if layers == "batch_norm":
        assert not keep[stream][1] and len(families[stream][1].producers) == (10 if shortcut == "A" else 4)
    else:
        assert stream not in keep
    for fam, groups in graph.families.items():
        for i, g in enumerate(groups):
            kept = bool(keep[fam][i]) if fam in keep else True  # not a candidate: never removed
            for layer, c in g.producers:
                assert bool(mask[f"{layer}.weight"][c].any()) == kept, (fam, i, layer)
            for layer, c in g.consumers:
                f = channel_graph.in_factor(model, graph, layer)
                assert bool(mask[f"{layer}.weight"][:, c * f:(c + 1) * f].any()) == kept, (fam, i, layer)
    removed = sum(int((~k).sum()) for k in keep.values())
    n = sum(len(gs) for gs in families.values())
    assert removed == int(n * 0.3)


def test_a_tied_stream_channel_scores_its_largest_gamma():
    model = _resnet()
    families = channel_families(model, "batch_norm")
    bn_of = structured.bn_after(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
        for c in (1, 2):  # stream channels 1 and 2 weak in all ten layers, but channel 2 strong in the last
            for layer, at in families["conv1"][c].producers:
                model.get_submodule(bn_of[layer]).weight[at] = 0.01
        model.layer3[2].bn2.weight[2] = 5.0
    keep = channel_keep(model, families, 0.01)  # 100 candidates: 1 goes
    assert keep["conv1"].tolist() == [True, False, True, True]
    assert all(k.all() for f, k in keep.items() if f != "conv1")


@pytest.mark.parametrize("layers,n", [("unshared", 84), ("batch_norm", 100)])
def test_the_distance_is_over_the_candidate_channels(layers, n):
    model = _resnet()
    eb = EarlyBird({"structure": "channel", "sparsity": 0.1, "window": 2, "epsilon": 0.1, "l1": 0.0,
                    **({"filter_layers": layers} if layers != "unshared" else {})}, total=100)
    ones = {name: torch.ones(m.num_features) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    weak = lambda chans: {"layer3.1.bn1": [0.1 if c in chans else 1.0 for c in range(16)]}  # noqa: E731
    state = TrainState(model, None, None, 0, 100, 100, 10)
    _set_gamma(model, ones | weak(range(int(n * 0.1))))  # epoch 1: the int(n/10) dropped, all in layer3.1's conv1
    state.it = 10
    eb.on_epoch_end(state, {"epoch": 1.0})
    assert not state.stop and eb.distances == []
    moved = list(range(3, int(n * 0.1) + 3))  # epoch 2: 3 channels leave the dropped set, 3 others join
    _set_gamma(model, ones | weak(moved))
    state.it = 20
    eb.on_epoch_end(state, {"epoch": 2.0})
    assert eb.distances == [6 / n] and state.stop  # 6 of the n candidate decisions differ: < 0.1
    dropped = ~state.mask["layer3.1.conv1.weight"].flatten(1).any(1)
    assert dropped.nonzero().squeeze(1).tolist() == moved
    assert sum(int((~m.flatten(1).any(1)).sum()) for m in state.mask.values()) == len(moved)


@pytest.mark.parametrize("layers", ["unshared", "batch_norm"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_the_masked_resnet_computes_what_the_physically_smaller_one_does(shortcut, layers):
    model = _resnet(shortcut).eval()
    graph = channel_graph.trace(model)
    mask = channel_weight_mask(model, channel_keep(model, channel_families(model, layers, graph), 0.5), graph)
    small = structured.physically_prune(model, mask).eval()
    masked = _resnet(shortcut).eval()
    apply_mask(masked, mask)
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(masked(x), small(x), atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def _resnet_raw(**over):
    raw = tiny_raw("early_bird", model={"name": "resnet20", "width": 0.25}, train={"epochs": 3},
                   retrain={"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "epochs": 1},
                   prune={"schedule": "one_shot", "sparsity": 0.3, "rate": None, "rounds": 1},
                   early_bird={"structure": "channel", "window": 2, "epsilon": 0.5})
    for k, v in over.items():
        raw[k] = v if k == "model" else {**raw[k], **v}
    return raw


def test_a_resnet_ticket_is_drawn_retrained_masked_and_built_smaller(tmp_path):
    spec = parse_spec(_resnet_raw(prune={"physical": True}))
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    rnd = plan.rounds[1]
    search = refs[rnd.mask.key]
    assert search.info.stopped_early["epoch"] == 2.0  # ε 0.5: the second mask is the ticket
    ticket = rt.store.load(search)["mask"]
    model = build_model("resnet20", (1, 16, 16), 10, seed=0, width=0.25)
    kept = structured.kept_filters(model, ticket)
    families = channel_families(model)
    assert sum(int(kept[f].sum()) for f in families) == 59  # 84 - int(84 · 0.3)
    assert all(kept[f].all() for f in kept if f not in families)  # the residual streams stay whole
    final = rt.store.load(refs[rnd.trained.key])["model"]
    for n, m in ticket.items():  # the retrained net is the masked ticket
        assert not final[n][~m].any()
    ev = refs[rnd.evaluate.key].info
    assert abs(ev.physical.test_acc - ev.test_acc) <= 1 / 300  # at most a near-tie flips
    assert ev.physical.cost["weights"] < structured.cost(model, (1, 16, 16))["weights"]


class _Grouped(nn.Module):
    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_shape[0], 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * in_shape[1] * in_shape[2], num_classes)

    def forward(self, x):
        return self.fc(self.bn2(self.conv2(self.bn1(self.conv1(x)))).flatten(1))


def test_channel_tickets_refuse_by_name_what_cannot_work(monkeypatch):
    from pai_core.models import registry

    with pytest.raises(SpecError, match=r"^early_bird.structure: channel ranks BatchNorm scales, and this "
                                        r"lenet_300_100 has no BatchNorm; allowed: a model with BatchNorm \(.*conv2 "
                                        r"with batch_norm: true.*resnet20.*\), or structure unstructured$"):
        parse_spec(_resnet_raw(model={"name": "lenet_300_100"}))
    monkeypatch.setitem(registry._MODELS, "grouped_bn_test",
                        registry.ModelInfo("grouped_bn_test", _Grouped, "test", batch_norm=True))
    with pytest.raises(SpecError, match=r"^early_bird.structure: channel needs the channel groups of grouped_bn_test: "
                                        r".*grouped convolution \(groups=2\).*; allowed: unstructured$"):
        parse_spec(_resnet_raw(model={"name": "grouped_bn_test"}))
    with pytest.raises(SpecError, match=r"^prune.sparsity: keeps 5 of the 84 BatchNorm channels, fewer than one per "
                                        r"layer \(9\)"):
        parse_spec(_resnet_raw(prune={"sparsity": 0.95}))
    parse_spec(_resnet_raw(prune={"sparsity": 0.89}))  # 84 - 74 = 10 kept: one per block and one more
    with pytest.raises(SpecError, match=r"^early_bird.filter_layers: Input should be 'unshared' or 'batch_norm'"):
        parse_spec(_resnet_raw(early_bird={"filter_layers": "all"}))
    with pytest.raises(SpecError,
                       match=r"^early_bird.filter_layers: only structure channel uses it; allowed: unshared$"):
        parse_spec(_resnet_raw(early_bird={"structure": "unstructured", "filter_layers": "batch_norm"}))
    with pytest.raises(SpecError, match=r"^prune.physical: the smaller net exists only for early_bird.structure "
                                        r"channel; allowed: false$"):
        parse_spec(_resnet_raw(early_bird={"structure": "unstructured"}, prune={"physical": True}))
