"""In-time over-parameterization (Liu et al. 2021): R_s, the fraction of the masked weights
ever in the mask, recorded by every dynamic method's training. Hand-computed unions on a tiny
net, the static case (R_s = density), every method's tracker against a union taken at every
step, bit-exact resume, old checkpoints and artifacts without it, and unchanged stage keys."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from conftest import random_sparse_start, tiny_raw
from flows.cli import app
from flows.round_metrics import itop_metrics
from pai_core.dynamic_methods import get_method
from pai_core.dynamic_methods.tools import InTimeOverparam, itop_rates
from pai_core.infos import TrainInfo
from pai_core.masks import sparsity
from pai_core.paradigms import build_plan
from pai_core.paradigms.dynamic_sparse import DynamicSpec
from pai_core.spec_io import parse_spec
from pai_core.specs import TrainSpec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.training import Callback, TrainState, train

METHODS = ("set", "rigl", "deepr", "dsr", "snfs", "granet", "topkast")
SGD = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, epochs=3)  # 60 iterations of 50 on synthetic
TOTAL = 60


def t(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


# ------------------------------------------------------------------ the union, by hand

class Scripted(Callback):
    """A stand-in method: at the given iterations it hands the loop the given masks (new tensors
    for the layers that change, the same tensor for those that do not), logging each update."""

    def __init__(self, script: dict[int, dict[str, torch.Tensor]]):
        self.script, self.updates = script, []

    def after_backward(self, state: TrainState) -> None:
        if state.it in self.script:
            state.mask = {**state.mask, **self.script[state.it]}
            self.updates.append({"iteration": state.it})

    def record(self):
        return {"mask_updates": self.updates}


def drive(cb: Callback, mask: dict[str, torch.Tensor], steps: int) -> None:
    """The training loop's hook order, without a model: on_start, then per iteration
    after_backward and on_step_end, then on_end."""
    state = TrainState(model=nn.Linear(1, 1), opt=None, mask=mask, it=0, stop_iter=steps, total=steps,
                       iterations_per_epoch=steps)
    cb.on_start(state)
    for it in range(steps):
        state.it = it
        cb.after_backward(state)
        state.it = it + 1
        cb.on_step_end(state)
    cb.on_end(state)


def test_a_hand_made_sequence_of_masks_gives_the_exact_union_per_layer_and_in_total():
    # layer a (6 weights): {0,1} -> {1,2} -> {3,4}: ever {0..4} = 5/6
    # layer b (4 weights): {0} -> (unchanged) -> {1}: ever {0,1} = 2/4; total 7/10
    start = {"a": t(1, 1, 0, 0, 0, 0).view(2, 3), "b": t(1, 0, 0, 0)}
    cb = InTimeOverparam(Scripted({3: {"a": t(0, 1, 1, 0, 0, 0).view(2, 3)},
                                   7: {"a": t(0, 0, 0, 1, 1, 0).view(2, 3), "b": t(0, 1, 0, 0)}}))
    drive(cb, start, 10)
    rec = cb.record()
    assert rec["itop_rate"] == pytest.approx(7 / 10)
    assert rec["itop_layers"] == {"a": pytest.approx(5 / 6), "b": pytest.approx(2 / 4)}
    # after update 1: a {0,1,2}, b {0} = 4/10; after update 2: 7/10
    assert rec["itop_history"] == [{"iteration": 3, "itop_rate": pytest.approx(0.4)},
                                   {"iteration": 7, "itop_rate": pytest.approx(0.7)}]
    assert rec["mask_updates"] == [{"iteration": 3}, {"iteration": 7}]  # the method's own record is kept
    assert itop_rates({"a": t(1, 0, 0, 0), "b": t(1, 1, 1, 1, 1, 1)}) == (0.7, {"a": 0.25, "b": 1.0})


def test_a_static_mask_gives_r_s_equal_to_its_density_exactly():
    data, model, mask = random_sparse_start(0, 0.1)
    cb = InTimeOverparam(Callback())  # a "method" that never moves the mask
    out = train(model, data, SGD, batch_size=50, order_seed=0, mask=mask, callbacks=[cb])
    rec = cb.record()
    kept, n = sum(int(m.sum()) for m in mask.values()), sum(m.numel() for m in mask.values())
    assert rec["itop_rate"] == kept / n and kept == round(0.1 * n) and rec["itop_history"] == []
    assert rec["itop_layers"] == {n: int(m.sum()) / m.numel() for n, m in mask.items()}
    assert all(torch.equal(out.mask[n], mask[n]) for n in mask)


# ------------------------------------------------------------------ every method, real training

def build(method: str, seed: int = 11) -> Callback:
    if method in ("set", "rigl"):
        d = DynamicSpec(method=method, update_interval=10).resolved()
    elif method == "granet":
        d = {"method": method, "params": {"interval": 10, "end_fraction": 0.75}, "final_density": 0.1}
    else:
        d = {"method": method, "params": {"deepr": {"alpha": 1e-4, "temperature": 1e-8}, "topkast": {"update_interval": 5},
                                          "dsr": {"interval": 5, "n_prune": 300}, "snfs": {}}[method]}
    return InTimeOverparam(get_method(method).build(d, TOTAL, seed))


def start(method: str):
    return random_sparse_start(0, 0.5 if method == "granet" else 0.1)


class EveryStep(Callback):
    """The union the slow way: OR the mask at the start and after every hook of every step."""

    def __init__(self):
        self.ever = None

    def _or(self, state):
        m = {n: v.detach().cpu().bool() for n, v in state.mask.items()}
        self.first = m if self.ever is None else self.first  # what training starts with (Top-KAST: its own A₀)
        self.ever = m if self.ever is None else {n: self.ever[n] | m[n] for n in m}

    on_start = after_backward = on_step_end = _or


@pytest.mark.parametrize("method", METHODS)
def test_every_method_records_the_union_of_every_mask_it_trained_with(method):
    data, model, mask = start(method)
    cb, slow = build(method), EveryStep()
    out = train(model, data, SGD, batch_size=50, order_seed=0, mask=mask, callbacks=[cb, slow])
    rec = cb.record()
    assert all(torch.equal(cb.ever[n], slow.ever[n]) for n in mask)
    assert rec["itop_rate"] == itop_rates(slow.ever)[0]
    assert all(torch.equal(cb.ever[n] | slow.first[n], cb.ever[n]) and torch.equal(cb.ever[n] | out.mask[n], cb.ever[n])
               for n in mask)  # the initial and the final mask are in it
    assert method == "topkast" or all(torch.equal(slow.first[n], mask[n]) for n in mask)
    final, initial = 1 - sparsity(out.mask), 1 - sparsity(mask)
    assert max(final, initial) < rec["itop_rate"] <= 1  # every method here moved weights
    history = [h["itop_rate"] for h in rec["itop_history"]]
    assert len(history) == len(rec["mask_updates"]) > 0 and history == sorted(history)  # a union only grows
    assert history[-1] <= rec["itop_rate"]
    assert [h["iteration"] for h in rec["itop_history"]] == [u["iteration"] for u in rec["mask_updates"]]


class Crash(Callback):
    def after_backward(self, state):
        if state.it == 45:
            raise KeyboardInterrupt("simulated kill mid epoch 3, after epoch 2's checkpoint")


def crash_and_resume(method: str, tmp_path, strip_itop: bool = False):
    data, _, mask = start(method)
    ckpt = tmp_path / "c.ckpt.pt"
    _, crashed, _ = start(method)
    with pytest.raises(KeyboardInterrupt):
        train(crashed, data, SGD, batch_size=50, order_seed=1, mask=mask, checkpoint=ckpt,
              callbacks=[build(method), Crash()])
    saved = torch.load(ckpt, weights_only=True)
    assert saved["iteration"] == 40 and saved["callbacks"][0]["itop"]["ever"]
    if strip_itop:  # a checkpoint written before R_s was tracked
        del saved["callbacks"][0]["itop"]
        torch.save(saved, ckpt)
        ckpt.with_name(ckpt.name + ".sha256").unlink(missing_ok=True)
    _, resumed, _ = start(method)
    again = build(method)  # a new process: the union comes only from the checkpoint
    train(resumed, data, SGD, batch_size=50, order_seed=1, mask=mask, checkpoint=ckpt, callbacks=[again])
    return again


@pytest.mark.parametrize("method", ["set", "rigl", "deepr"])
def test_a_resumed_run_records_the_same_r_s_as_an_uninterrupted_one(method, tmp_path):
    data, model, mask = start(method)
    whole = build(method)
    train(model, data, SGD, batch_size=50, order_seed=1, mask=mask, callbacks=[whole])
    again = crash_and_resume(method, tmp_path)
    assert again.record() == whole.record() and whole.record()["itop_rate"] > 1 - sparsity(mask)
    assert all(torch.equal(again.ever[n], whole.ever[n]) for n in mask)


def test_a_checkpoint_without_the_union_records_no_r_s_rather_than_an_undercount(tmp_path):
    again = crash_and_resume("set", tmp_path, strip_itop=True)
    rec = again.record()
    assert "itop_rate" not in rec and "itop_history" not in rec and rec["mask_updates"]
    assert "itop" in again.state_dict() and again.state_dict()["itop"] is None  # stays unknown on a later resume


# ------------------------------------------------------------------ the plan, results, tracking

def dyn_raw(method: str = "rigl") -> dict:
    return tiny_raw("dynamic_sparse", prune={"criterion": "random", "schedule": "one_shot", "sparsity": 0.9,
                                             "rate": None, "rounds": 1, "scope": "erk"},
                    dynamic={"method": method, "update_interval": 10})


def test_the_train_stage_stores_r_s_and_results_tracking_show_it_old_artifacts_blank(tmp_path, pai_home):
    spec = parse_spec(dyn_raw())
    plan = build_plan(spec)
    store = Store(pai_home / "store")
    refs = run_plan(plan.nodes, Runtime(store, "cpu"))
    trained = plan.rounds[1].trained
    info = refs[trained.key].info
    final = store.load(refs[trained.key])["mask"]
    assert 1 - info.sparsity < info.itop_rate <= 1 and set(info.itop_layers) == set(final)
    assert len(info.itop_history) == len(info.mask_updates) > 0
    ever = sum(round(r * final[n].numel()) for n, r in info.itop_layers.items())
    assert info.itop_rate == pytest.approx(ever / sum(m.numel() for m in final.values()))

    metrics = {(m.key, m.step): m.value for m in itop_metrics(info, 0)}
    assert metrics[("itop_rate", 0)] == info.itop_rate
    assert {k for k, s in metrics if k.startswith("itop/")} == {f"itop/{n}" for n in final}
    assert [metrics[("itop_history", h["iteration"])] for h in info.itop_history] == \
        [h["itop_rate"] for h in info.itop_history]

    from flows.tracking import Tracker  # MLflow in pai_home (sqlite), no server
    tracker = Tracker(spec, store)
    rid = tracker.log_round(plan.rounds[1], refs, reused=False)
    run = tracker.client.get_run(rid)
    assert run.data.metrics["itop_rate"] == pytest.approx(info.itop_rate)
    assert run.data.metrics["itop/fc1.weight"] == pytest.approx(info.itop_layers["fc1.weight"])
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(rid, "itop_history")] == \
        [(h["iteration"], pytest.approx(h["itop_rate"])) for h in info.itop_history]
    assert "itop.json" in {a.path for a in tracker.client.list_artifacts(rid)}
    assert tracker.rounds[-1]["itop_rate"] == info.itop_rate  # the parent's round/itop_rate

    path = tmp_path / "dyn.yaml"
    path.write_text(yaml.safe_dump(dyn_raw()))

    def row():
        res = CliRunner().invoke(app, ["results", str(path)], terminal_width=250)
        assert res.exit_code == 0, res.output
        assert "ITOP" in res.output
        return next(line for line in res.output.splitlines() if line.startswith("│ rigl"))

    assert f"{info.itop_rate:.4f}" in row()
    # An artifact made before R_s was tracked: no field, a blank cell, no metric, no crash.
    old = json.loads(store.meta_path("train", trained.key).read_text())["info"]
    old = {k: v for k, v in old.items() if not k.startswith("itop_")}
    store.put("train", trained.key, store.load(refs[trained.key]), old)
    ref = store.get("train", trained.key)
    assert ref.info.itop_rate is None and itop_metrics(ref.info, 0) == []
    rid = tracker.log_round(plan.rounds[1], {**refs, trained.key: ref}, reused=False)
    assert "itop_rate" not in tracker.client.get_run(rid).data.metrics and "itop_rate" not in tracker.rounds[-1]
    assert f"{info.itop_rate:.4f}" not in row() and "yes" in row()


def test_other_flows_show_no_itop_column(tmp_path, pai_home):
    path = tmp_path / "lth.yaml"
    path.write_text(yaml.safe_dump(tiny_raw()))
    res = CliRunner().invoke(app, ["results", str(path)], terminal_width=250)
    assert res.exit_code == 0 and "ITOP" not in res.output
    assert itop_metrics(TrainInfo(arch={"model": {"name": "x"}, "in_shape": [1], "num_classes": 2}, iteration=0),
                        0) == []
