"""IteRand (Chijiwa et al. 2021): edge-popup whose pruned weights are redrawn every K_per steps.

Every check is against values set or counted by hand: which weights a redraw may touch (the
pruned ones, by the current scores), how many it touches (Binomial(pruned, r)), what it draws
(the frozen weights' own distribution), when (the stated schedule), and that a resumed select
stage is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import ROOT, tiny_raw
from pai_core.data import load
from pai_core.infos import Arch
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.spec_io import SpecError, load_spec, parse_spec
from pai_core.specs import TrainSpec
from pai_core.stages import Runtime, run_plan
from pai_core.stages import select as select_stage
from pai_core.store import Store
from pai_core.iterand import IteRand, redraw_seed, rerandomize, rerandomize_due
from pai_core.supermask import Selector
from pai_core.training import Callback, evaluate, train

MARK = 7.0  # a candidate value no frozen weight has: where it appears, a weight was redrawn


def tiny_selector(rows: int = 4, cols: int = 50, keep: float = 0.5) -> Selector:
    """One Linear layer at ±1, scores set by hand: |s| = 0..n-1 in a fixed shuffled order."""
    layer = nn.Linear(cols, rows)
    with torch.no_grad():
        layer.weight.copy_(torch.where(torch.arange(rows * cols).view(rows, cols) % 3 == 0, -1.0, 1.0))
    sel = Selector(nn.Sequential(layer), ["0.weight"], "edge_popup", keep)
    order = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(5)).float()
    with torch.no_grad():
        sel.scores["0"].copy_((order * torch.where(order % 2 == 0, 1.0, -1.0)).view(rows, cols))  # signs mixed
    return sel


def hand_kept(sel: Selector) -> torch.Tensor:
    """The top round(keep · n) of |s|: |s| is a permutation of 0..n-1, so it is |s| >= n - k."""
    s = sel.scores["0"].detach()
    return s.abs() >= s.numel() - round(sel.keep * s.numel())


def test_rate_one_redraws_exactly_the_pruned_weights():
    sel = tiny_selector()
    kept = hand_kept(sel)
    assert int(kept.sum()) == 100
    w = sel.model[0].weight
    before, scores = w.detach().clone(), sel.scores["0"].detach().clone()
    n = rerandomize({"0.weight": w}, sel.eval_masks()[0], {"0.weight": torch.full_like(w, MARK)}, 1.0, 0, 300)
    assert n == 100
    assert torch.equal(w[~kept], torch.full((100,), MARK))
    assert torch.equal(w[kept], before[kept]), "kept weights bit for bit"
    assert torch.equal(sel.scores["0"], scores), "scores untouched"


def test_rate_r_redraws_a_binomial_share_of_the_pruned_and_never_a_kept_one():
    sel = tiny_selector(rows=100, cols=100)  # 5,000 pruned weights
    kept = hand_kept(sel)
    w = sel.model[0].weight
    before = w.detach().clone()
    fresh = {"0.weight": torch.full_like(w, MARK)}
    n = rerandomize({"0.weight": w}, sel.eval_masks()[0], fresh, 0.1, 3, 600)
    redrawn = w == MARK
    assert int(redrawn.sum()) == n
    assert abs(n - 500) < 4 * math.sqrt(5000 * 0.1 * 0.9), "Binomial(5000, 0.1): 500 ± 85 at 4 sigma"
    assert not redrawn[kept].any() and torch.equal(w[~redrawn], before[~redrawn])
    # the coin flips depend on (seed, iteration) only: the same again, another iteration differs
    again = before.clone()
    rerandomize({"0.weight": again}, sel.eval_masks()[0], fresh, 0.1, 3, 600)
    assert torch.equal(again, w)
    other = before.clone()
    rerandomize({"0.weight": other}, sel.eval_masks()[0], fresh, 0.1, 3, 900)
    assert not torch.equal(other, w)


def test_rate_zero_changes_nothing():
    sel = tiny_selector()
    w = sel.model[0].weight
    before = w.detach().clone()
    assert rerandomize({"0.weight": w}, sel.eval_masks()[0], {"0.weight": torch.full_like(w, MARK)}, 0.0, 0, 1) == 0
    assert torch.equal(w, before)


def test_redraws_come_from_the_frozen_weights_distribution():
    arch = Arch(model={"name": "lenet_300_100"}, in_shape=[1, 28, 28], num_classes=10)
    names = ["fc1.weight", "fc2.weight", "fc3.weight"]
    draw = select_stage.fresh_draws(arch, names, "signed_constant", seed=11)
    a, b = draw(300), draw(600)
    for name, fan_in in zip(names, (784, 300, 100)):
        c = math.sqrt(2 / fan_in)  # ±sqrt(2/fan_in): every value one of the two
        assert torch.equal(a[name].abs(), torch.full_like(a[name], c)), name
        assert abs(float((a[name] > 0).float().mean()) - 0.5) < 0.05, "a fair sign"
    assert torch.equal(a["fc1.weight"], draw(300)["fc1.weight"]), "a function of (seed, iteration)"
    assert not torch.equal(a["fc1.weight"], b["fc1.weight"])
    init = select_stage.fresh_draws(arch, names, "init", seed=11)(300)["fc1.weight"]
    glorot = math.sqrt(2 / (784 + 300))  # LeNet-300-100's own init: Glorot normal
    assert abs(float(init.mean())) < 0.01 * glorot and abs(float(init.std()) / glorot - 1) < 0.01
    assert torch.equal(init.sign(), a["fc1.weight"].sign()), "signed constant = sign of the same fresh init"
    seeds = {redraw_seed(11, it) for it in (300, 600, 900)} | {redraw_seed(12, 300)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)


def test_schedules_by_hand():
    paper = [d for d in range(11) if rerandomize_due(d, 3, "paper")]
    reference = [d for d in range(11) if rerandomize_due(d, 3, "reference")]
    assert paper == [3, 6, 9], "after steps K, 2K, ..."
    assert reference == [2, 5, 8], "the authors' code: before step K, i.e. after K-1 steps"
    assert [d for d in range(3) if rerandomize_due(d, 1, "reference")] == [0, 1, 2]


class Spy(Callback):
    """After IteRand in the list: the weights at every step end, and the kept set then."""

    def __init__(self, sel: Selector):
        self.sel, self.rows = sel, []

    def on_step_end(self, state):
        w = {n: p.detach().clone() for n, p in self.sel.model.named_parameters() if n in self.sel.names}
        self.rows.append((state.it, w, self.sel.eval_masks()[0]))


@pytest.mark.parametrize("timing, due", [("paper", [7, 14, 21, 28, 35]), ("reference", [6, 13, 20, 27, 34])])
def test_weights_change_only_on_schedule_and_only_where_pruned(timing, due):
    data = load("synthetic")
    model = build_model("lenet_300_100", data.in_shape, data.num_classes, seed=0)
    names = ["fc1.weight", "fc2.weight", "fc3.weight"]
    sel = Selector(model, names, "edge_popup", 0.3, seed=4)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def draw(it):  # MARK + it: every redraw writes a value no weight had before
        calls.append(it)
        return {n: torch.full_like(start[n], MARK + it) for n in names}

    it_rand, spy = IteRand(sel, 7, 0.5, draw, timing), Spy(sel)
    train(sel, data, TrainSpec(optimizer="adam", lr=0.01, momentum=0.0, weight_decay=0.0, epochs=2),
          batch_size=50, order_seed=0, callbacks=[it_rand, spy])
    assert len(spy.rows) == 40, "1000 examples / 50 per batch, 2 epochs"
    assert calls == due and [e["iteration"] for e in it_rand.events] == due
    previous, counts = start, {}
    for it, w, kept in spy.rows:
        for n in names:
            changed = w[n] != previous[n]
            if it in due:
                assert changed.any() and not (changed & kept[n]).any(), (it, n)
                assert torch.equal(w[n][changed], torch.full((int(changed.sum()),), MARK + it))
                counts[it] = counts.get(it, 0) + int(changed.sum())
            else:
                assert not changed.any(), f"{n} moved at step {it}, off schedule"
        previous = w
    assert counts == {e["iteration"]: e["redrawn"] for e in it_rand.events}
    bias = dict(model.named_parameters())["fc1.bias"]
    assert torch.equal(bias, start["fc1.bias"]), "only prunable weights are redrawn"


def test_iterand_refuses_a_non_edge_popup_selector_and_bad_arguments():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="edge_popup"):
        IteRand(Selector(model, ["0.weight"], "supermask"), 3, 0.1, lambda it: {})
    sel = Selector(nn.Sequential(nn.Linear(4, 2)), ["0.weight"], "edge_popup")
    for every, rate, timing in ((0, 0.1, "paper"), (3, 1.5, "paper"), (3, 0.1, "later")):
        with pytest.raises(ValueError):
            IteRand(sel, every, rate, lambda it: {}, timing)


# --- the spec, the plan keys and the select stage ------------------------------------------------

EDGE_POPUP = ROOT / "configs/supermask/edge_popup_lenet300_mnist.yaml"
SUPERMASK = ROOT / "configs/supermask/supermask_lenet300_mnist.yaml"
ITERAND = ROOT / "configs/supermask/iterand_lenet300_mnist.yaml"


def keys(path, *overrides):
    plan = build_plan(load_spec(path, list(overrides)))
    return {n.role: n.key for n in plan.nodes}


def test_existing_selection_configs_keep_their_keys():
    """Computed with the code before IteRand existed."""
    assert keys(EDGE_POPUP) == {"init": "8cc42ad981beb3a24757", "select": "9fad141edbad2e31a652",
                                "evaluate": "6551826bdf82d4b873f6"}
    assert keys(SUPERMASK) == {"init": "8cc42ad981beb3a24757", "select": "c6a4eadb74bd03521a7e",
                               "evaluate": "4c238b799015d0a63432"}


def test_iterand_config_shares_edge_popups_init_and_keys_its_parameters():
    ep, it = keys(EDGE_POPUP), keys(ITERAND)
    assert it["init"] == ep["init"] and it["select"] != ep["select"]
    spec = load_spec(ITERAND, [])
    assert spec.train == load_spec(EDGE_POPUP, []).train and spec.data == load_spec(EDGE_POPUP, []).data
    assert build_plan(spec).nodes[1].fields["selection"] == {
        "method": "iterand", "keep": 0.5, "weights": "signed_constant", "evaluation": "sampled",
        "rerandomize": {"every": 300, "rate": 0.1, "timing": "paper"}}
    assert keys(ITERAND, "selection.rerandomize=null") == it, "unset = the paper's defaults"
    for override in ("selection.rerandomize.every=100", "selection.rerandomize.rate=0.2",
                     "selection.rerandomize.timing=reference"):
        assert keys(ITERAND, override)["select"] != it["select"], override


@pytest.mark.parametrize("selection, field, says", [
    ({"rerandomize": {"every": 0}}, "selection.rerandomize.every", "greater than or equal to 1"),
    ({"rerandomize": {"every": 60}}, "selection.rerandomize.every", "no redraw inside the 60 score steps"),
    ({"rerandomize": {"rate": 1.5}}, "selection.rerandomize.rate", "less than or equal to 1"),
    ({"rerandomize": {"rate": -0.1}}, "selection.rerandomize.rate", "greater than or equal to 0"),
    ({"rerandomize": {"timing": "later"}}, "selection.rerandomize.timing", "'paper' or 'reference'"),
    ({"rerandomize": {"lambda": 0.1}}, "selection.rerandomize.lambda", "unknown field; allowed: every, rate, timing"),
    ({"score_init": "constant"}, "selection.score_init", "allowed: uniform"),
    ({"method": "edge_popup", "rerandomize": {"every": 5}}, "selection.rerandomize", "only method iterand"),
])
def test_bad_parameters_are_refused_by_name(selection, field, says):
    raw = tiny_raw("supermask", train={"epochs": 3})
    raw.pop("prune")
    raw["selection"] = {"method": "iterand"} | selection
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    line = str(err.value)
    assert line.startswith(f"{field}:") and says in line and "\n" not in line, line


def iterand_spec(**rerandomize):
    raw = tiny_raw("supermask", train={"optimizer": "adam", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0,
                                       "epochs": 3})
    raw.pop("prune")
    raw["selection"] = {"method": "iterand", "keep": 0.3, "rerandomize": {"every": 8, "rate": 0.5, **rerandomize}}
    return parse_spec(raw)


class CrashingProgress(select_stage.ProgressCallback):
    """The select stage's own progress callback, killed mid epoch 3 (iteration 45 of 60),
    after epoch 2's checkpoint (iteration 40, itself a redraw step: 8 · 5)."""

    def after_backward(self, state):
        if state.it == 45:
            raise KeyboardInterrupt("simulated kill")


def test_resumed_select_stage_is_bit_identical_and_evaluates_its_last_weights(tmp_path, monkeypatch):
    spec = iterand_spec()
    plan = build_plan(spec)
    node, ev = plan.rounds[0].trained, plan.rounds[0].evaluate
    whole = Runtime(Store(tmp_path / "whole"), "cpu")
    refs = run_plan(plan.nodes, whole)
    out = whole.store.load(refs[node.key])

    crashed = Runtime(Store(tmp_path / "crashed"), "cpu")
    with monkeypatch.context() as m:
        m.setattr(select_stage, "ProgressCallback", CrashingProgress)
        with pytest.raises(KeyboardInterrupt):
            run_plan(plan.nodes, crashed)
    ckpt = torch.load(crashed.store.checkpoint_path(node.stage, node.key), weights_only=True)
    assert ckpt["iteration"] == 40 and [e["iteration"] for e in ckpt["callbacks"][1]["events"]] == [8, 16, 24, 32, 40]
    again = crashed.store.load(run_plan(plan.nodes, crashed)[node.key])

    for part in ("model", "scores", "mask"):
        assert out[part].keys() == again[part].keys()
        assert all(torch.equal(out[part][k], again[part][k]) for k in out[part]), part
    assert out["rerandomized"] == again["rerandomized"]
    assert [e["iteration"] for e in out["rerandomized"]] == [8, 16, 24, 32, 40, 48, 56]
    assert all(e["redrawn"] > 0 for e in out["rerandomized"])

    # the weights moved away from the signed constant start, only ever to ±sqrt(2/fan_in)
    init = whole.store.load(refs[node.inputs["init"].key])["model"]
    for name, mask in out["mask"].items():
        w, w0 = out["model"][name], init[name]
        c = math.sqrt(2.0 / w0[0].numel())
        assert torch.equal(w.abs(), torch.full_like(w, c)) and not torch.equal(w, torch.sign(w0) * c), name
        assert int(mask.sum()) == round(0.3 * mask.numel())
    assert torch.equal(out["model"]["fc1.bias"], init["fc1.bias"])

    # evaluate measured the last weights under the mask
    data = load("synthetic")
    model = build_model("lenet_300_100", data.in_shape, 10, seed=0)
    model.load_state_dict({k: v * out["mask"][k] if k in out["mask"] else v for k, v in out["model"].items()})
    info = refs[ev.key].info
    assert info.test_acc == evaluate(model, data.test)["acc"] and info.test_acc > 0.5
    assert info.sparsity == pytest.approx(0.7, abs=1e-3)


def test_export_loads_the_stored_iterand_round(tmp_path):
    from pai_core.export_round import export_round, load_masked_model

    spec = iterand_spec(timing="reference")
    plan = build_plan(spec)
    store = Store(tmp_path / "store")
    refs = run_plan(plan.nodes, Runtime(store, "cpu"))
    stored = store.load(refs[plan.rounds[0].trained.key])
    assert [e["iteration"] for e in stored["rerandomized"]] == [7, 15, 23, 31, 39, 47, 55]
    r = load_masked_model(spec, None, store)
    for name, mask in stored["mask"].items():
        assert torch.equal(dict(r.model.named_parameters())[name].detach(), stored["model"][name] * mask)
    manifest = export_round(spec, None, "dense", tmp_path / "out", store=store)
    assert manifest.format == "dense" and (tmp_path / "out" / manifest.file).exists()
