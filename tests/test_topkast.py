"""Top-KAST (pai_core/dynamic_methods/topkast.py): the two sets exact per layer from the dense
init, one step against a hand computation (B \\ A stepped by the sparse forward's gradient and the
1/D-scaled penalty, θ outside B untouched, A re-chosen from |θ| with the entering weights' values
and fresh state), masked weights zero, bit-exact resume with R_s, bad params refused by name, the
config sharing the other methods' init and start mask (its plan runs in test_dynamic_methods)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, random_sparse_start, tiny_raw
from pai_core.catalog import catalog
from pai_core.dynamic_methods import dynamic_method_names, get_method
from pai_core.dynamic_methods.tools import InTimeOverparam
from pai_core.dynamic_methods.topkast import TopKAST, TopKASTParams, top_sets
from pai_core.paradigms import build_plan
from pai_core.spec_io import SpecError, load_spec, parse_spec
from pai_core.specs import TrainSpec
from pai_core.training import Callback, TrainState, train

DYN = ROOT / "configs" / "dynamic"


def test_topkast_is_registered_listed_and_offered_by_the_form():
    from pai_core.paradigms.dynamic_sparse import DynamicSpec

    assert "topkast" in dynamic_method_names() and get_method("topkast").label == "Top-KAST"
    listed = {name: what for kind, name, what in catalog() if kind.startswith("dynamic method")}
    assert "Jayakumar" in listed["topkast"] and "backward_multiple" in listed["topkast"]
    assert "topkast" in DynamicSpec.model_json_schema()["properties"]["method"]["enum"]


def test_the_config_shares_init_and_start_mask_with_rigl_and_keys_its_resolved_params():
    ours, rigl = (build_plan(load_spec(DYN / f"{m}_lenet300_mnist.yaml")) for m in ("topkast", "rigl"))
    assert [n.key for n in ours.nodes[:5]] == [n.key for n in rigl.nodes[:5]]  # init, pretrain, evaluate, score, mask
    assert ours.rounds[1].trained.fields["dynamic"] == {
        "method": "topkast", "params": {"backward_multiple": 2.0, "update_interval": 1, "penalty": 0.0001}}


def dyn_raw(params: dict | None = None) -> dict:
    return tiny_raw("dynamic_sparse", prune={"criterion": "random", "schedule": "one_shot", "sparsity": 0.9,
                                             "rate": None, "rounds": 1, "scope": "erk"},
                    dynamic={"method": "topkast", **({"params": params} if params is not None else {})})


@pytest.mark.parametrize("params, says", [
    ({"backward_multiple": 0.5}, "dynamic.params.backward_multiple: Input should be greater than or equal to 1"),
    ({"update_interval": 0}, "dynamic.params.update_interval: Input should be greater than or equal to 1"),
    ({"penalty": -1e-4}, "dynamic.params.penalty: Input should be greater than or equal to 0"),
    ({"update_interval": 10**6}, "dynamic.params.update_interval: no set would be chosen again"),
    ({"drop_fraction": 0.3}, "dynamic.params.drop_fraction: unknown field; allowed: backward_multiple, "
                             "update_interval, penalty"),
])
def test_a_bad_param_is_refused_naming_its_field(params, says):
    with pytest.raises(SpecError) as e:
        parse_spec(dyn_raw(params))
    assert str(e.value).startswith(says), str(e.value)


def test_top_sets_are_exact_nested_and_break_ties_to_the_lower_index():
    v = torch.tensor([[0.5, -0.9, 0.1], [0.5, 0.0, -0.3]])
    a, b = top_sets(v, 2, 4)
    assert a.tolist() == [[True, True, False], [False, False, False]]  # 0.9, then the first 0.5
    assert b.tolist() == [[True, True, False], [True, False, True]] and bool((a <= b).all())
    g = torch.Generator().manual_seed(0)
    for _ in range(300):  # the O(n) selection is a stable descending sort's first k, ties and all
        n = int(torch.randint(1, 60, (1,), generator=g))
        v = torch.randint(-4, 5, (n,), generator=g).float()
        ka = int(torch.randint(0, n + 1, (1,), generator=g))
        kb = int(torch.randint(ka, n + 1, (1,), generator=g))
        order = torch.sort(v.abs(), descending=True, stable=True).indices
        a, b = top_sets(v, ka, kb)
        assert sorted(a.nonzero().squeeze(1).tolist()) == sorted(order[:ka].tolist())
        assert sorted(b.nonzero().squeeze(1).tolist()) == sorted(order[:kb].tolist())


class Recorder(Callback):
    def __init__(self):
        self.masks, self.weights = [], []

    def on_step_end(self, state):
        self.masks.append({n: m.clone() for n, m in state.mask.items()})
        self.weights.append(state.model[0].weight.detach().clone())


def tiny(weights):
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(weights).reshape(2, 4))
    return model


@pytest.mark.parametrize("weight_decay, penalty", [(0.01, None), (0.0, 0.01)], ids=["decay", "penalty"])
def test_one_step_by_hand(weight_decay, penalty):
    """8 weights, a start mask of 2 (A: the 2 largest |θ| of the dense init, not the mask's own
    choice), B of 4. One SGD step, λ = 0.01 as the optimizer's weight decay or as Top-KAST's own
    `penalty` (the same step): A by the gradient and λθ, B \\ A by the same (dense) gradient and
    λθ/D, the rest unchanged; then A and B from |θ| again."""
    w0 = torch.tensor([0.9, -0.05, 0.3, -0.8, 0.02, 0.31, -0.29, 0.01])
    start = {"0.weight": torch.tensor([False, True, False, False, False, False, False, True]).reshape(2, 4)}
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    y = torch.tensor([1])
    lr, lam = 0.5, 0.01
    model = tiny(w0.tolist())
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    cb = TopKAST(TopKASTParams(backward_multiple=2, penalty=penalty), total=10)
    state = TrainState(model, opt, dict(start), 0, 10, 10, 10)
    cb.before_masking(state)
    cb.on_start(state)  # the loop's order: before_masking, the start mask applied, on_start
    a0 = torch.tensor([True, False, False, True, False, False, False, False]).reshape(2, 4)  # |0.9|, |-0.8|
    b0 = torch.tensor([True, False, False, True, False, True, False, False]).reshape(2, 4)
    b0.view(-1)[2] = True  # 0.31, 0.3: the 3rd and 4th largest
    assert torch.equal(state.mask["0.weight"], a0) and torch.equal(cb.backward["0.weight"], b0)
    assert torch.equal(model[0].weight.detach(), (w0 * a0.reshape(-1)).reshape(2, 4))

    # the hand computation: the loss at the sparse forward, its gradient for every weight
    alpha = (w0 * a0.reshape(-1)).reshape(2, 4).requires_grad_(True)
    F.cross_entropy(x @ alpha.t(), y).backward()
    g = alpha.grad.reshape(-1)
    theta = w0.clone()
    explore = (b0 & ~a0).reshape(-1)
    theta[explore] -= lr * (g[explore] + lam * 8 / 2 * w0[explore])  # D = 2/8
    on = a0.reshape(-1)
    theta[on] -= lr * (g[on] + lam * w0[on])  # SGD with λθ: the optimizer's decay or the penalty

    F.cross_entropy(model(x), y).backward()
    cb.after_backward(state)
    model[0].weight.grad.mul_(state.mask["0.weight"])  # what the loop's enforcer does, then the step
    opt.step()
    state.it = 1
    cb.on_step_end(state)
    assert torch.allclose(cb.theta["0.weight"].reshape(-1), theta, atol=1e-7)
    untouched = ~b0.reshape(-1)
    assert torch.equal(cb.theta["0.weight"].reshape(-1)[untouched], w0[untouched])  # θ outside B: bit for bit
    want_a, want_b = top_sets(theta.reshape(2, 4), 2, 4)
    assert torch.equal(state.mask["0.weight"], want_a) and torch.equal(cb.backward["0.weight"], want_b)
    assert torch.equal(model[0].weight.detach(), torch.where(want_a, theta.reshape(2, 4), 0.0))


def test_a_weight_entering_a_brings_its_value_and_fresh_momentum():
    model = tiny([1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.4, 0.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cb = TopKAST(TopKASTParams(), total=10)
    state = TrainState(model, opt, {"0.weight": torch.tensor([True] * 2 + [False] * 6).reshape(2, 4)}, 0, 10, 10, 10)
    cb.before_masking(state)  # A = {1.0, 0.5}, B = A + {0.4} + the first zero
    cb.on_start(state)
    opt.state[model[0].weight]["momentum_buffer"] = torch.full((2, 4), 7.0)
    with torch.no_grad():
        model[0].weight.view(-1)[2] = 0.1  # A's 0.5 trained down below the explored 0.4
    state.it = 1
    cb.on_step_end(state)
    a = state.mask["0.weight"].reshape(-1)
    assert a.nonzero().squeeze(1).tolist() == [0, 6]
    w = model[0].weight.detach().reshape(-1)
    assert w[6] == pytest.approx(0.4) and w[2] == 0 and cb.theta["0.weight"].reshape(-1)[2] == pytest.approx(0.1)
    momentum = opt.state[model[0].weight]["momentum_buffer"].reshape(-1)
    assert momentum[6] == 0 and momentum[0] == 7  # the new weight starts without history, the kept one keeps it


class Exact(Callback):
    """After every step: each layer holds exactly its start count, every weight outside A is zero."""

    def __init__(self):
        self.steps = 0

    def on_start(self, state):
        self.counts = {n: int(m.sum()) for n, m in state.mask.items()}
        self.first = {n: m.clone() for n, m in state.mask.items()}

    def on_step_end(self, state):
        params = dict(state.model.named_parameters())
        assert {n: int(m.sum()) for n, m in state.mask.items()} == self.counts
        for n, m in state.mask.items():
            assert not params[n].detach()[~m.to(params[n].device)].any()
        self.steps += 1


SGD = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, epochs=3)


def test_training_keeps_the_counts_exact_moves_the_mask_and_learns():
    data, model, mask = random_sparse_start(0, 0.1)
    check = Exact()
    cb = InTimeOverparam(TopKAST(TopKASTParams(), 60))
    out = train(model, data, SGD, batch_size=50, order_seed=0, mask=mask, callbacks=[cb, check])
    assert check.steps == 60 and out.history[-1]["test_acc"] > 0.2  # chance: 0.1
    assert {n: int(m.sum()) for n, m in mask.items()} == check.counts  # the start mask's counts per layer
    assert any(not torch.equal(out.mask[n], check.first[n]) for n in mask)  # A moved
    rec = cb.record()
    assert [u["iteration"] for u in rec["mask_updates"]] == [20, 40, 60] and sum(u["entered"] for u in
                                                                                 rec["mask_updates"]) > 0
    assert rec["itop_rate"] > 0.1


def test_the_first_forward_set_is_the_top_k_of_the_dense_init_not_the_start_masks_choice():
    data, model, mask = random_sparse_start(0, 0.1)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {}

    class First(Callback):
        def on_start(self, state):
            seen.update({n: m.clone() for n, m in state.mask.items()})

    train(model, data, TrainSpec(optimizer="sgd", lr=0.05, epochs=1), batch_size=50, order_seed=0, mask=mask,
          stop_iter=1, callbacks=[TopKAST(TopKASTParams(), 20), First()])
    for n, m in mask.items():
        assert torch.equal(seen[n], top_sets(init[n], int(m.sum()), 0)[0])


class Crash(Callback):
    def after_backward(self, state):
        if state.it == 45:
            raise KeyboardInterrupt("simulated kill mid epoch 3, after epoch 2's checkpoint")


@pytest.mark.parametrize("interval", [1, 7])
def test_a_resumed_training_equals_an_uninterrupted_one_bit_for_bit(interval, tmp_path):
    def make():
        return InTimeOverparam(TopKAST(TopKASTParams(update_interval=interval), 60))
    data, full, mask = random_sparse_start(0, 0.1)
    whole = make()
    out = train(full, data, SGD, batch_size=50, order_seed=1, mask=mask, callbacks=[whole])
    ckpt = tmp_path / "c.ckpt.pt"
    _, crashed, _ = random_sparse_start(0, 0.1)
    with pytest.raises(KeyboardInterrupt):
        train(crashed, data, SGD, batch_size=50, order_seed=1, mask=mask, checkpoint=ckpt, callbacks=[make(), Crash()])
    assert torch.load(ckpt, weights_only=True)["iteration"] == 40
    _, resumed, _ = random_sparse_start(0, 0.1)
    again = make()  # a new process: the state comes only from the checkpoint
    out2 = train(resumed, data, SGD, batch_size=50, order_seed=1, mask=mask, checkpoint=ckpt, callbacks=[again])
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    assert all(torch.equal(out.mask[n], out2.mask[n]) for n in mask)
    assert again.record() == whole.record()
