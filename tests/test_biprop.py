"""biprop (multi-prize tickets MPT-1/32) against hand computations: the forward is edge-popup's
top-k over binary weights α·sign(w), α the mean |w| kept in each layer; every score gets the
reference's gradient g·|w| through the sign (dL/dw_eff ⊙ w, as edge-popup); the stored network
is the binarized one, so evaluating it reproduces the trained forward exactly; the frozen
weights never move; the spec takes it and the other methods keep their keys."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from conftest import ROOT
from pai_core.paradigms import build_plan
from pai_core.spec_io import load_spec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.supermask import Selector, binary_gain, signed_kaiming_constant
from test_supermask import spec_for


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()


NAMES = ["0.weight", "2.weight"]


def by_hand(model: nn.Module, scores: dict[str, torch.Tensor], keep: float):
    """The top-k masks, α and binary weights written out."""
    params = dict(model.named_parameters())
    out = {}
    for n in NAMES:
        k = round(keep * scores[n].numel())
        mask = torch.zeros(scores[n].numel(), dtype=torch.float64)
        mask[torch.sort(scores[n].abs().flatten(), descending=True, stable=True).indices[:k]] = 1
        mask = mask.view_as(scores[n])
        alpha = (params[n].detach().abs() * mask).sum() / k
        out[n] = (mask, alpha, torch.sign(params[n].detach()) * alpha * mask)
    return out


def test_the_forward_uses_binary_weights_scaled_by_the_mean_kept_magnitude():
    model = net()
    sel = Selector(model, NAMES, "biprop", keep=0.4, seed=3).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    scores = {n: sel.scores[str(i)].detach() for i, n in enumerate(NAMES)}
    hand = by_hand(model, scores, 0.4)
    want = functional_call(model, {n: hand[n][2] for n in NAMES}, (x,), strict=False)
    torch.testing.assert_close(sel(x), want, rtol=1e-12, atol=1e-14)
    for n in NAMES:
        assert binary_gain(dict(model.named_parameters())[n], hand[n][0]) == pytest.approx(float(hand[n][1]))


def test_every_score_gets_the_references_gradient_g_times_abs_w():
    model = net()
    sel = Selector(model, NAMES, "biprop", keep=0.4, seed=3).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    sel(x).square().sum().backward()
    scores = {n: sel.scores[str(i)].detach() for i, n in enumerate(NAMES)}
    hand = by_hand(model, scores, 0.4)
    eff = {n: hand[n][2].clone().requires_grad_() for n in NAMES}
    functional_call(model, eff, (x,), strict=False).square().sum().backward()
    params = dict(model.named_parameters())
    for i, n in enumerate(NAMES):
        # d|s|/ds = sign(s); the reference sends g·|w| to |s|, g = dL/d(α·mask) = dL/dw_eff ⊙ sign(w)
        want = eff[n].grad * params[n].detach() * torch.sign(scores[n])
        torch.testing.assert_close(sel.scores[str(i)].grad, want, rtol=1e-12, atol=1e-14)
        assert (sel.scores[str(i)].grad[hand[n][0] == 0] != 0).any(), "pruned weights' scores learn too"
    assert all(p.grad is None for p in model.parameters())


def test_over_signed_constant_weights_biprop_is_edge_popup():
    # |w| = c everywhere: α = c, α·sign(w) = w, and g·|w| = (dL/dw_eff ⊙ sign(w))·c = dL/dw_eff ⊙ w
    model = net()
    with torch.no_grad():
        for n in NAMES:
            w = model.get_parameter(n)
            w.copy_(signed_kaiming_constant(w))
    x = torch.randn(7, 6, dtype=torch.float64)
    outs, grads = [], []
    for method in ("biprop", "edge_popup"):
        sel = Selector(model, NAMES, method, keep=0.4, seed=3).double()
        out = sel(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([sel.scores[str(i)].grad for i in range(len(NAMES))])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-14)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_the_stored_network_is_the_binarized_one():
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sel = Selector(model, NAMES, "biprop", keep=0.4, seed=3).double()
    state, mask = sel.result()
    x = torch.randn(7, 6, dtype=torch.float64)
    stored = {n: state[n] * mask[n].double() for n in NAMES}
    sel.eval()
    torch.testing.assert_close(functional_call(model, stored, (x,), strict=False), sel(x), rtol=1e-12, atol=1e-14)
    for n in NAMES:
        assert len(state[n].abs().unique()) == 1  # ±α, one magnitude per layer
        assert torch.equal(torch.sign(state[n]), torch.sign(before[n]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "frozen weights untouched"


def test_a_biprop_run_learns_stores_binary_weights_and_evaluates_them(tmp_path):
    plan = build_plan(spec_for({"method": "biprop", "keep": 0.3}))
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    node = plan.rounds[0].trained
    out = rt.store.load(refs[node.key])
    init = rt.store.load(refs[node.inputs["init"].key])["model"]
    for name, m in out["mask"].items():
        w, w0 = out["model"][name], init[name]
        assert int(m.sum()) == round(0.3 * m.numel())
        alpha = float((w0.abs() * m).sum() / m.sum())
        torch.testing.assert_close(w, torch.sign(w0) * alpha)
    assert refs[plan.rounds[0].evaluate.key].info.test_acc > 0.6, "far above chance with untrained weights"


def test_the_example_config_shares_edge_popups_init_and_the_others_keep_their_keys():
    mine = build_plan(load_spec(ROOT / "configs/supermask/biprop_lenet300_mnist.yaml", []))
    edge = build_plan(load_spec(ROOT / "configs/supermask/edge_popup_lenet300_mnist.yaml", []))
    assert mine.rounds[0].trained.inputs["init"].key == edge.rounds[0].trained.inputs["init"].key
    assert mine.rounds[0].trained.fields["selection"] == {"method": "biprop", "keep": 0.5, "weights": "init",
                                                         "evaluation": "sampled"}
