"""Sparse selection: the mask is learned, every weight stays bit-for-bit what it was."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import tiny_raw
from pai_core.data import Split
from pai_core.paradigms import build_plan
from pai_core.spec_io import SpecError, parse_spec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.supermask import PAPER_DEFAULTS, Selector, sample_masks


def spec_for(selection, **train):
    raw = tiny_raw("supermask", train={"optimizer": "adam", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0,
                                       "epochs": 4, **train})
    raw.pop("prune")
    raw["selection"] = selection
    return parse_spec(raw)


@pytest.mark.parametrize("selection", [
    {"method": "edge_popup", "keep": 0.3},
    {"method": "supermask", "evaluation": "sampled"},
    {"method": "supermask", "evaluation": "expected"},
    {"method": "supermask"},  # the reference's: constant start, mean over 10 sampled masks
])
def test_weights_never_change_and_the_mask_learns(tmp_path, selection):
    # Scores behind a sigmoid move slowly: Zhou et al. train them at a far higher rate.
    spec = spec_for(selection, lr=0.01 if selection["method"] == "edge_popup" else 0.1)
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    node = plan.rounds[0].trained
    out = rt.store.load(refs[node.key])
    init = rt.store.load(refs[node.inputs["init"].key])["model"]
    mask = out["mask"]
    for name, w0 in init.items():
        w = out["model"][name]
        if name not in mask:
            assert torch.equal(w, w0), name  # biases: bit for bit
        elif selection["method"] == "edge_popup":  # frozen at the signed Kaiming constant
            assert torch.equal(w, torch.sign(w0) * math.sqrt(2.0 / w0[0].numel()))
            assert int(mask[name].sum()) == round(0.3 * mask[name].numel())
        elif selection.get("evaluation", "sampled_mean") in ("sampled", "sampled_mean"):
            assert torch.equal(w, w0)
        elif selection["evaluation"] == "expected":  # the reference's round(σ(s)): sparse, weights untouched
            assert torch.equal(w, w0)
            assert torch.equal(mask[name], torch.sigmoid(out["scores"][name]) > 0.5)
        else:  # expected_dense: w ⊙ σ(s), a dense net
            assert torch.equal(w, w0 * torch.sigmoid(out["scores"][name]))
    assert not torch.equal(out["scores"]["fc1.weight"], torch.zeros(0))
    ev = refs[plan.rounds[0].evaluate.key].info
    assert ev.test_acc > 0.6, "far above chance (0.1) with untrained weights"
    if selection["method"] == "edge_popup":
        assert ev.sparsity == pytest.approx(0.7, abs=1e-3)
    if "evaluation" not in selection and selection["method"] == "supermask":  # the stage's mean, by hand
        from pai_core.data import load
        from pai_core.models import build_model
        from pai_core.supermask import mean_over_masks, sample_masks

        data = load("synthetic")
        model = build_model("lenet_300_100", data.in_shape, 10, seed=0)
        model.load_state_dict(out["model"])
        masks = sample_masks(out["scores"], out["mean_of"]["seed"], 10)
        assert out["mean_of"]["samples"] == 10 and all(torch.equal(masks[0][n], mask[n]) for n in mask)
        assert ev.test_acc == mean_over_masks(model, masks, data.test)["acc"]


def test_supermask_spec_rejects_prune_settings():
    raw = tiny_raw("supermask")
    raw["selection"] = {"method": "edge_popup"}
    with pytest.raises(SpecError, match="prune: unknown field"):
        parse_spec(raw)


# --- Selector options against the reference (uber-research/deconstructing-lottery-tickets) ---


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


NAMES = ["0.weight", "2.weight"]


def test_reference_defaults_and_constant_score_init():
    assert Selector.paper_defaults("supermask") == {"score_init": "constant", "score_constant": 0.0,
                                                    "evaluation": "sampled_mean", "eval_samples": 10}
    sel = Selector(tiny_net(), NAMES, "supermask")  # score_init None = the reference's constant
    assert sel.score_init == "constant"
    for s in sel.scores.values():  # masked_networks.py: Constant(sigmoid_bias), --sigmoid_bias 0
        assert torch.equal(s, torch.full_like(s, PAPER_DEFAULTS["supermask"]["score_constant"]))
        assert torch.equal(torch.sigmoid(s), torch.full_like(s, 0.5))
    assert all(torch.equal(s, torch.full_like(s, -1.5)) for s in
               Selector(tiny_net(), NAMES, "supermask", score_constant=-1.5).scores.values())
    uni = Selector(tiny_net(), NAMES, "supermask", seed=3, score_init="uniform")  # the former init
    g = torch.Generator().manual_seed(3)
    for i, w in enumerate([uni.model[0].weight, uni.model[2].weight]):
        bound = 1 / math.sqrt(w.shape[1])
        assert torch.equal(uni.scores[str(i)], (torch.rand(w.shape, generator=g) * 2 - 1) * bound)
    with pytest.raises(ValueError):
        Selector(tiny_net(), NAMES, "edge_popup", score_init="constant")
    with pytest.raises(ValueError):
        Selector(tiny_net(), NAMES, "supermask", evaluation="logits_mean")


def test_expected_is_the_reference_rounding_rule():
    net = nn.Sequential(nn.Linear(3, 2))
    sel = Selector(net, ["0.weight"], "supermask", evaluation="expected")
    with torch.no_grad():  # σ(1e-9) rounds to exactly 0.5 in float32: dropped, as TF's round(0.5) = 0
        sel.scores["0"].copy_(torch.tensor([[-2.0, 0.0, 0.5], [1e-9, 3.0, -0.1]]))
    by_hand = torch.tensor([[False, False, True], [False, True, False]])
    sel.eval()
    assert torch.equal(sel.eval_masks()[0]["0.weight"], by_hand)
    x = torch.randn(5, 3)
    want = x @ (net[0].weight * by_hand).T + net[0].bias
    assert torch.equal(sel(x), sel(x)) and torch.allclose(sel(x), want)
    state, mask = sel.result()
    assert torch.equal(mask["0.weight"], by_hand) and torch.equal(state["0.weight"], net[0].weight)


def test_expected_dense_keeps_the_former_probability_weighted_net():
    sel = Selector(tiny_net(), NAMES, "supermask", evaluation="expected_dense", score_init="uniform")
    state, mask = sel.result()
    for i, n in enumerate(NAMES):
        w0 = dict(sel.model.named_parameters())[n]
        assert torch.equal(state[n], w0 * torch.sigmoid(sel.scores[str(i)]))
        assert bool(mask[n].all())


def test_sampled_mean_averages_ten_seeded_masks():
    net = tiny_net(1)
    sel = Selector(net, NAMES, "supermask", evaluation="sampled_mean", seed=11, score_init="uniform")
    with torch.no_grad():
        for s in sel.scores.values():
            s.mul_(8)  # spread the probabilities so samples differ in accuracy
    split = Split(torch.randn(200, 6, generator=torch.Generator().manual_seed(2)), torch.arange(200) % 3)
    masks = sel.eval_masks()
    assert len(masks) == 10 == sel.eval_samples
    assert len({tuple(m["0.weight"].flatten().tolist()) for m in masks}) == 10, "independent draws"
    accs = []
    for m in masks:  # by hand: a copy of the net with w ⊙ m, accuracy on the whole split
        probe = tiny_net(1)
        with torch.no_grad():
            for n, p in probe.named_parameters():
                if n in m:
                    p.mul_(m[n].float())
        accs.append((probe(split.x).argmax(1) == split.y).sum().item() / len(split))
    assert len(set(accs)) > 1
    got = sel.evaluate(split)
    assert got["acc"] == pytest.approx(sum(accs) / 10, abs=1e-12)
    assert sel.evaluate(split) == got, "seeded: the same numbers twice"
    assert sel.training and sel.model.training, "evaluate() leaves the modes as they were"
    again = Selector(tiny_net(1), NAMES, "supermask", evaluation="sampled_mean", seed=11, score_init="uniform")
    again.load_state_dict(sel.state_dict())
    assert all(torch.equal(a[n], b[n]) for a, b in zip(masks, again.eval_masks()) for n in NAMES)
    stored = {n: sel.scores[str(i)].detach() for i, n in enumerate(NAMES)}  # the select stage's payload
    assert all(torch.equal(a[n], b[n]) for a, b in zip(masks, sample_masks(stored, 11, 10)) for n in NAMES)
    _, mask = sel.result()  # one concrete mask is stored: the first sample
    assert all(torch.equal(mask[n], masks[0][n]) for n in NAMES)
    sel.eval()  # eval-mode forward uses that same first sample
    w = {n: p * masks[0][n] if n in masks[0] else p for n, p in net.named_parameters()}
    assert torch.equal(sel(split.x), torch.func.functional_call(net, w, (split.x,)))


def test_edge_popup_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sel = Selector(net, ["0.weight", "2.weight"], "edge_popup", 0.4, "sampled", seed=7)
    g = torch.Generator().manual_seed(7)  # the scores' init, as before the supermask options
    for i, w in enumerate([net[0].weight, net[2].weight]):
        assert torch.equal(sel.scores[str(i)], (torch.rand(w.shape, generator=g) * 2 - 1) * (1 / math.sqrt(w.shape[1])))
    opt = torch.optim.SGD(sel.parameters(), lr=0.5)
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 4
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(sel(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, mask = sel.result()
    for i, n in enumerate(["0.weight", "2.weight"]):
        s = sel.scores[str(i)].detach().abs().flatten()
        top = torch.zeros_like(s, dtype=torch.bool)
        top[torch.sort(s, descending=True, stable=True).indices[:round(0.4 * s.numel())]] = True
        assert torch.equal(mask[n], top.view_as(mask[n]))
    # kept weights of the last layer after 5 steps, recorded with the code before the supermask options
    assert mask["2.weight"].flatten().nonzero().flatten().tolist() == [
        2, 4, 6, 8, 10, 16, 17, 20, 23, 24, 26, 28, 30, 31, 34, 35, 37, 40, 43, 44, 48, 52, 58, 59, 62, 63]
    assert int(mask["0.weight"].sum()) == 51


def test_selection_on_cifar_like_data_trains_with_its_augmentation(tmp_path, monkeypatch):
    """The select stage runs the same training loop, so CIFAR-shaped data gets crop+flip there too
    (and an MNIST-like spec keeps an unaugmented key)."""
    import pai_core.training as training

    raw = tiny_raw("supermask", train={"optimizer": "adam", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0,
                                       "epochs": 1}, data={"dataset": "synthetic_cifar", "batch_size": 100})
    raw.pop("prune")
    raw["selection"] = {"method": "edge_popup", "keep": 0.3}
    plan = build_plan(parse_spec(raw))
    select = plan.rounds[0].trained
    assert select.fields["data"]["augment"] == ["crop", "flip"]
    plain = build_plan(spec_for({"method": "edge_popup", "keep": 0.3})).rounds[0].trained
    assert "augment" not in plain.fields["data"]
    calls = []
    real = training.augment_batch

    def spy(x, kinds, *args, **kwargs):
        calls.append(tuple(kinds))
        return real(x, kinds, *args, **kwargs)

    monkeypatch.setattr(training, "augment_batch", spy)
    run_plan(plan.nodes, Runtime(Store(tmp_path), "cpu"))
    assert calls and set(calls) == {("crop", "flip")}
