"""GraNet (pai_core/dynamic_methods/granet.py): the density follows the cubic schedule and ends
exactly at the spec's, a neuroregeneration step against a hand computation, masked weights stay
zero, bit-exact resume, bad params refused by name before compute, other specs' keys unchanged."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import ROOT, crash_and_resume, random_sparse_start, tiny_raw
from pai_core.catalog import catalog
from pai_core.dynamic_methods import dynamic_method_names, get_method
from pai_core.dynamic_methods.granet import GraNet, GraNetParams, neuroregenerate
from pai_core.paradigms import build_plan
from pai_core.spec_io import SpecError, load_spec, parse_spec
from pai_core.specs import TrainSpec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.training import Callback, train

DYN = ROOT / "configs" / "dynamic"
N = 16 * 16 * 300 + 300 * 100 + 100 * 10  # LeNet-300-100's prunable weights on 16x16 synthetic data: 107,800


# ------------------------------------------------------------------ registry, specs, keys

def test_granet_is_registered_listed_and_offered_by_the_form():
    from pai_core.paradigms.dynamic_sparse import DynamicSpec

    assert "granet" in dynamic_method_names() and get_method("granet").label == "GraNet"
    listed = {name: what for kind, name, what in catalog() if kind.startswith("dynamic method")}
    assert "Liu" in listed["granet"] and "initial_density" in listed["granet"]
    assert "granet" in DynamicSpec.model_json_schema()["properties"]["method"]["enum"]


def test_the_config_shares_init_and_dense_round_with_rigl_and_starts_at_its_initial_density():
    ours, rigl = (build_plan(load_spec(DYN / f"{m}_lenet300_mnist.yaml")) for m in ("granet", "rigl"))
    assert [n.key for n in ours.nodes[:4]] == [n.key for n in rigl.nodes[:4]]  # init, pretrain, evaluate, score
    rnd = ours.rounds[1]
    assert rnd.mask.fields["density"] == 0.5 and rnd.mask.fields["scope"] == "erk" and rnd.density == 1 - 0.95
    assert rnd.trained.fields["dynamic"] == {"method": "granet", "final_density": 1 - 0.95, "params": {
        "initial_density": 0.5, "interval": 200, "start_fraction": 0.0, "end_fraction": 0.6875,
        "regrow_fraction": 0.5, "final_regrow_fraction": 0.005, "regrow_until": "pruning_end"}}


def dyn_raw(params: dict | None = None, sparsity: float = 0.9, **fields) -> dict:
    return tiny_raw("dynamic_sparse", prune={"criterion": "random", "schedule": "one_shot", "sparsity": sparsity,
                                             "rate": None, "rounds": 1, "scope": "erk"},
                    dynamic={"method": "granet", **({"params": params} if params is not None else {}), **fields})


def test_the_final_density_enters_the_train_key_and_the_initial_one_the_mask_key():
    plan = build_plan(parse_spec(dyn_raw({"interval": 5})))
    sparser = build_plan(parse_spec(dyn_raw({"interval": 5}, sparsity=0.95)))
    denser_start = build_plan(parse_spec(dyn_raw({"interval": 5, "initial_density": 0.8})))
    assert plan.rounds[1].mask.key == sparser.rounds[1].mask.key != denser_start.rounds[1].mask.key
    assert plan.rounds[1].trained.key != sparser.rounds[1].trained.key
    assert plan.rounds[1].trained.fields["dynamic"]["final_density"] == pytest.approx(0.1)


def test_the_layerwise_variant_enters_the_train_key_only_when_chosen():
    """Options added after GraNet's keys were stored leave every existing key as it was (the
    configs' keys are pinned in test_dynamic_methods) and enter the key when set."""
    plan = build_plan(parse_spec(dyn_raw({"interval": 5})))
    uniform = build_plan(parse_spec(dyn_raw({"interval": 5, "pruning_scope": "layerwise"})))
    floored = build_plan(parse_spec(dyn_raw({"interval": 5, "pruning_scope": "layerwise", "last_layer_floor": 0.3})))
    params = [p.rounds[1].trained.fields["dynamic"]["params"] for p in (plan, uniform, floored)]
    assert "pruning_scope" not in params[0] and "last_layer_floor" not in params[0]
    assert params[1]["pruning_scope"] == "layerwise" and "last_layer_floor" not in params[1]
    assert params[2]["last_layer_floor"] == 0.3
    assert len({p.rounds[1].trained.key for p in (plan, uniform, floored)}) == 3
    assert plan.rounds[1].mask.key == uniform.rounds[1].mask.key  # the same start


# (the tiny spec trains 40 iterations: the pruning window ends at int(0.6875 · 40) = 27)
@pytest.mark.parametrize("params, sparsity, field, says", [
    ({"initial_density": 0}, 0.9, "initial_density", "Input should be greater than 0 (got 0); allowed: "
                                                      "initial_density, interval, start_fraction"),
    ({"initial_density": 1.5}, 0.9, "initial_density", "less than or equal to 1"),
    ({"initial_density": 0.05}, 0.9, "initial_density", "0.05 is below the final density 0.1 (1 - prune.sparsity)"
                                                         ", and pruning only removes weights; allowed: 0.1 to 1"),
    ({"interval": 0}, 0.9, "interval", "greater than 0"),
    ({"interval": "often"}, 0.9, "interval", "valid integer"),
    ({"end_fraction": 1.0}, 0.9, "end_fraction", "less than 1"),
    ({"start_fraction": 0.5, "end_fraction": 0.5}, 0.9, "end_fraction",
     "the pruning window is empty: it starts at iteration 20 (start_fraction 0.5) and ends at 20"),
    ({"end_fraction": 0.01}, 0.9, "end_fraction", "ends at 0 (end_fraction 0.01 of 40)"),
    ({"regrow_fraction": 1}, 0.9, "regrow_fraction", "less than 1"),
    ({"final_regrow_fraction": 0.6}, 0.9, "final_regrow_fraction", "0.6 is above regrow_fraction 0.5"),
    ({"regrow_until": "end"}, 0.9, "regrow_until", "Input should be 'pruning_end' or 'training_end'"),
    ({"intervall": 5}, 0.9, "intervall", "unknown field; allowed: initial_density, interval"),
    ({"temperature": float("nan")}, 0.9, "temperature", "unknown field"),
    ({"regrow_fraction": float("nan")}, 0.9, "regrow_fraction", "finite number"),
    ({"pruning_scope": "erk"}, 0.9, "pruning_scope", "Input should be 'global' or 'layerwise'"),
    ({"last_layer_floor": 0.3}, 0.9, "last_layer_floor", "0.3 applies to pruning_scope layerwise only; allowed: set "
                                                         "pruning_scope: layerwise, or leave last_layer_floor out"),
    ({"pruning_scope": "layerwise", "last_layer_floor": 1.5}, 0.9, "last_layer_floor", "less than or equal to 1"),
])
def test_a_bad_param_is_refused_naming_its_field(params, sparsity, field, says):
    with pytest.raises(SpecError) as e:
        parse_spec(dyn_raw(params, sparsity))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"dynamic.params.{field}: ") and says in msg, msg


def test_a_set_rigl_option_is_refused_and_the_cli_refuses_before_anything_runs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    with pytest.raises(SpecError, match=r"^dynamic.update_interval: a set/rigl option; granet takes its options"):
        parse_spec(dyn_raw({}, update_interval=5))
    monkeypatch.setenv("PAI_HOME", str(tmp_path / "home"))
    out = CliRunner().invoke(app, ["validate", str(DYN / "granet_lenet300_mnist.yaml"),
                                   "dynamic.params.initial_density=0.01"])
    assert out.exit_code == 2 and "dynamic.params.initial_density: 0.01 is below the final density 0.05" in out.output
    assert not (tmp_path / "home" / "store").exists()


MUTATIONS = {"null": None, "text": "x", "list": [1], "mapping": {"a": 1}, "negative": -1, "zero": 0,
             "2**70": 2**70, "nan": float("nan"), "inf": float("inf"), "huge": 1e300, "true": True}


@pytest.mark.parametrize("label", MUTATIONS)
def test_every_param_mutated_is_accepted_or_refused_naming_it(label):
    for field in GraNetParams.model_fields:
        try:
            spec = parse_spec(dyn_raw({field: MUTATIONS[label]}))
        except SpecError as e:
            assert str(e).startswith(f"dynamic.params.{field}: ") and "\n" not in str(e), str(e)
            continue
        assert build_plan(spec).rounds[1].trained.fields["dynamic"]["params"][field] is not None


# ------------------------------------------------------------------ the rule on tiny tensors

def test_neuroregeneration_drops_the_smallest_live_and_regrows_the_largest_gradient_dead():
    # live 0..3: |w| = .4 .1 .3 .2 -> k = 2 drops w1, w3. Not kept: {1, 3, 4, 5, 6, 7} with
    # |g| = .9 0 .5 .8 .05 .3 -> regrows w1 (just dropped, comes back) and w5 (dead).
    w = torch.tensor([0.4, -0.1, 0.3, 0.2, 0, 0, 0, 0])
    g = torch.tensor([0.0, 0.9, 0.1, 0.0, 0.5, -0.8, 0.05, 0.3])
    now = neuroregenerate(w.abs(), g.abs(), torch.tensor([True] * 4 + [False] * 4), 2)
    assert now.nonzero().squeeze(1).tolist() == [0, 1, 2, 5]


def one_layer():
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.4, -0.1, 0.3, 0.2, 0, 0, 0, 0]).reshape(2, 4))
    model[0].weight.grad = torch.tensor([0.0, 0.9, 0.1, 0.0, 0.5, -0.8, 0.05, 0.3]).reshape(2, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.state[model[0].weight]["momentum_buffer"] = torch.arange(1.0, 9.0).reshape(2, 4)
    return model, opt, {"0.weight": torch.tensor([True] * 4 + [False] * 4).reshape(2, 4)}


def test_a_regeneration_step_keeps_the_density_zero_inits_new_weights_and_their_state():
    model, opt, mask = one_layer()
    # density stays 0.5 (4 of 8 kept: no pruning step), r = 0.5 throughout: k = ⌈0.5·4⌉ = 2
    cb = GraNet(GraNetParams(initial_density=0.5, regrow_fraction=0.5, final_regrow_fraction=0.5), 1000, 0.5)
    new = cb.update(100, model, opt, mask)["0.weight"].reshape(-1)
    w, buf = model[0].weight.detach().reshape(-1), opt.state[model[0].weight]["momentum_buffer"].reshape(-1)
    assert new.nonzero().squeeze(1).tolist() == [0, 1, 2, 5]
    assert w.tolist() == pytest.approx([0.4, -0.1, 0.3, 0, 0, 0, 0, 0])  # w1 regrown keeps its value; w5 new: 0
    assert buf[[0, 1, 2]].tolist() == [1, 2, 3] and buf[5] == 0  # the new connection has no history
    assert cb.updates == [{"iteration": 100, "density": 0.5, "pruned": 0, "regrow_fraction": 0.5, "moved": 2,
                           "regrown": 1}]


def test_an_update_prunes_globally_to_the_schedule_then_regenerates_per_layer():
    # A: live 0..5 |w| .9 .05 .7 .02 .6 .3; B: live 0..5 |w| .8 .01 .5 .04 .4 .2 -> 12 of 16 kept.
    # 1. global to density 0.5 (8 kept): the 4 smallest go, B1 .01, A3 .02, B3 .04, A1 .05.
    # 2. r = 0.25, n = 4 per layer -> k = 1: A drops A5 (.3) and regrows the largest |g| not kept, A6 (.3);
    #    B drops B5 (.2) and regrows B1 (.7): pruned in step 1, so it comes back at zero with no history.
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.9, 0.05, 0.7, 0.02, 0.6, 0.3, 0, 0]).reshape(2, 4))
        model[1].weight.copy_(torch.tensor([0.8, -0.01, 0.5, 0.04, -0.4, 0.2, 0, 0]).reshape(4, 2))
    model[0].weight.grad = torch.tensor([0, 0.2, 0, 0.1, 0, 0.15, -0.3, 0.05]).reshape(2, 4)
    model[1].weight.grad = torch.tensor([0, -0.7, 0, 0.1, 0, 0.2, 0.3, 0]).reshape(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.ones_like(p)
    six = torch.tensor([True] * 6 + [False] * 2)
    mask = {"0.weight": six.reshape(2, 4), "1.weight": six.reshape(4, 2)}
    params = GraNetParams(initial_density=0.75, interval=10, end_fraction=0.5, regrow_fraction=0.25,
                          final_regrow_fraction=0.25)
    cb = GraNet(params, total=100, final_density=0.5)
    assert cb.due(50) and cb.density_at(50) == 0.5
    new = cb.update(50, model, opt, mask)
    a, b = new["0.weight"].reshape(-1), new["1.weight"].reshape(-1)
    assert a.nonzero().squeeze(1).tolist() == [0, 2, 4, 6] and b.nonzero().squeeze(1).tolist() == [0, 1, 2, 4]
    assert model[0].weight.detach().reshape(-1).tolist() == pytest.approx([0.9, 0, 0.7, 0, 0.6, 0, 0, 0])
    assert model[1].weight.detach().reshape(-1).tolist() == pytest.approx([0.8, 0, 0.5, 0, -0.4, 0, 0, 0])
    ma = opt.state[model[0].weight]["momentum_buffer"].reshape(-1)
    mb = opt.state[model[1].weight]["momentum_buffer"].reshape(-1)
    assert ma[[0, 2, 4]].tolist() == [1, 1, 1] and ma[6] == 0 and mb[[0, 2, 4]].tolist() == [1, 1, 1] and mb[1] == 0
    assert cb.updates == [{"iteration": 50, "density": 0.5, "pruned": 4, "regrow_fraction": 0.25, "moved": 2,
                           "regrown": 0}]


def test_the_layerwise_variant_prunes_every_layer_to_the_same_density_with_the_last_layers_floor():
    # A (8 weights, all live) and B, the last layer (8, all live); no regrowth (regrow_fraction 0).
    def fresh() -> tuple[nn.Module, torch.optim.Optimizer, dict]:  # an update zeroes what it prunes
        model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 4, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(torch.tensor([8., 7, 6, 5, 4, 3, 2, 1]).reshape(2, 4))
            model[1].weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]).reshape(4, 2))
        full = {"0.weight": torch.ones(2, 4, dtype=torch.bool), "1.weight": torch.ones(4, 2, dtype=torch.bool)}
        return model, torch.optim.SGD(model.parameters(), lr=0.1), full

    uniform = GraNetParams(initial_density=1.0, interval=10, end_fraction=0.5, regrow_fraction=0,
                           pruning_scope="layerwise", last_layer_floor=0.25)
    new = GraNet(uniform, total=100, final_density=0.5).update(50, *fresh())  # d = 0.5, above the floor:
    assert new["0.weight"].reshape(-1).tolist() == [True] * 4 + [False] * 4   # 4 of 8 in each layer by its own |w|;
    assert new["1.weight"].reshape(-1).tolist() == [False] * 4 + [True] * 4   # global keeps A's 8 largest, none of B
    assert GraNet(GraNetParams(initial_density=1.0, interval=10, end_fraction=0.5, regrow_fraction=0),
                  total=100, final_density=0.5).update(50, *fresh())["1.weight"].sum() == 0
    # d = 0.125 (2 of 16) is below the floor 0.25: the last layer keeps 2 of 8 and the others
    # (16·0.125 − 0.25·8) / 8 = 0: what select allows, its smallest positive share (1 of 8)
    assert uniform.layer_densities({"0.weight": 8, "1.weight": 8}, 0.125, "1.weight") == (0.125, {"1.weight": 0.25})
    assert uniform.layer_densities({"0.weight": 24, "1.weight": 8}, 0.125, "1.weight") == (
        pytest.approx((32 * 0.125 - 0.25 * 8) / 24), {"1.weight": 0.25})
    assert uniform.layer_densities({"0.weight": 24, "1.weight": 8}, 0.3, "1.weight") == (0.3, {})
    # the classifier left out of the mask (prune.ignore): no floor, not even on the last masked layer
    assert uniform.layer_densities({"0.weight": 24, "1.weight": 8}, 0.125, "2.weight") == (0.125, {})
    thin = GraNet(uniform, total=100, final_density=0.125)
    new = thin.update(50, *fresh())
    assert int(new["1.weight"].sum()) == 2 and int(new["0.weight"].sum()) == 1


def test_the_regrow_fraction_is_cosine_decayed_over_the_whole_training():
    p = GraNetParams()
    assert [p.regrow_at(t, 1000) for t in (0, 500, 1000)] == pytest.approx([0.5, 0.2525, 0.005])
    assert GraNetParams(regrow_fraction=0, final_regrow_fraction=0).regrow_at(0, 1000) == 0


# ------------------------------------------------------------------ training: the schedule, resume

def sparse_start(seed=0, density=0.5):
    return random_sparse_start(seed, density)


class Watch(Callback):
    """After GraNet's hook: the kept count at every iteration, that no masked weight is nonzero
    after any step, and the weights that were ever newly grown."""

    def __init__(self):
        self.kept, self.grown, self.steps = {}, 0, 0

    def after_backward(self, state):
        self.kept[state.it] = sum(int(m.sum()) for m in state.mask.values())
        if state.it and self.before is not state.mask:
            self.grown += sum(int((state.mask[n] & ~self.before[n]).sum()) for n in state.mask)
        self.before = state.mask

    def on_start(self, state):
        self.before = state.mask

    def on_step_end(self, state):
        params = dict(state.model.named_parameters())
        for n, m in state.mask.items():
            assert torch.count_nonzero(params[n].detach()[~m.to(params[n].device)]) == 0
        self.steps += 1


SGD = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=3)
ADAM = TrainSpec(optimizer="adam", lr=1e-3, epochs=3)


@pytest.mark.parametrize("spec", [SGD, ADAM], ids=["sgd", "adam"])
def test_the_density_follows_the_cubic_schedule_and_ends_exactly_at_the_target(spec):
    # 60 iterations, window [0, 30], every 10: d_t = 0.1 + 0.4·(1 − t/30)³ at t = 10, 20, 30.
    data, model, mask = sparse_start()
    watch = Watch()
    cb = GraNet(GraNetParams(initial_density=0.5, interval=10, end_fraction=0.5), total=60, final_density=0.1)
    out = train(model, data, spec, batch_size=50, order_seed=0, mask=mask, callbacks=[cb, watch])
    expected = {0: round(N * 0.5), 10: round(N * (0.1 + 0.4 * (2 / 3) ** 3)), 20: round(N * (0.1 + 0.4 / 27)),
                30: round(N * 0.1)}
    assert expected[10] == 23_556 and expected[20] == 12_377 and expected[30] == 10_780  # by hand: N = 107,800
    assert [u["iteration"] for u in cb.updates] == [10, 20, 30]
    for it, kept in watch.kept.items():
        assert kept == expected[max(t for t in expected if t <= it)], it
    assert sum(int(m.sum()) for m in out.mask.values()) == 10_780 and watch.steps == 60
    assert watch.grown > 0 and all(u["moved"] > 0 for u in cb.updates)  # neuroregeneration happened
    assert out.history[-1]["test_acc"] > 0.2  # chance: 0.1


def test_regrowth_after_the_window_only_with_the_reference_codes_variant():
    data, model, mask = sparse_start()
    params = GraNetParams(initial_density=0.5, interval=10, end_fraction=0.5, regrow_until="training_end")
    cb, watch = GraNet(params, total=60, final_density=0.1), Watch()
    train(model, data, SGD, batch_size=50, order_seed=0, mask=mask, callbacks=[cb, watch])
    assert [u["iteration"] for u in cb.updates] == [10, 20, 30, 40, 50]
    assert {watch.kept[it] for it in range(30, 60)} == {10_780} and cb.updates[-1]["moved"] > 0
    assert not GraNet(GraNetParams(interval=10, end_fraction=0.5), 60, 0.1).due(40)


def make() -> GraNet:
    params = GraNetParams(initial_density=0.5, interval=10, end_fraction=0.75, regrow_until="training_end")
    return get_method("granet").build({"method": "granet", "params": params.model_dump(), "final_density": 0.1},
                                      60, 11)


@pytest.mark.parametrize("spec", [SGD, ADAM], ids=["sgd", "adam"])
def test_a_resumed_training_equals_an_uninterrupted_one_bit_for_bit(spec, tmp_path):
    r = crash_and_resume(sparse_start, make, spec, tmp_path)
    assert r["checkpointed"] == 40
    assert all(torch.equal(a, b) for a, b in zip(r["full"].state_dict().values(), r["resumed"].state_dict().values()))
    assert all(torch.equal(r["out"].mask[n], r["out2"].mask[n]) for n in r["mask"])
    assert r["again"].record() == r["whole"].record()
    assert [u["iteration"] for u in r["again"].record()["mask_updates"]] == [10, 20, 30, 40, 45, 50]


@pytest.mark.parametrize("initial", [0.5, 1.0], ids=["sparse_start", "dense_start"])
def test_the_plan_starts_at_the_initial_density_and_evaluates_the_final_mask(tmp_path, initial):
    spec = parse_spec(dyn_raw({"interval": 5, "initial_density": initial}))
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    start = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    assert sum(int(m.sum()) for m in start.values()) == round(N * initial)
    if initial == 1.0:
        assert all(bool(m.all()) for m in start.values())
    trained = rt.store.load(refs[plan.rounds[1].trained.key])
    assert sum(int(m.sum()) for m in trained["mask"].values()) == round(N * 0.1)
    info, ev = refs[plan.rounds[1].trained.key].info, refs[plan.rounds[1].evaluate.key].info
    assert [u["iteration"] for u in info.mask_updates] == [5, 10, 15, 20, 25, 27]  # window end: int(0.6875·40)
    assert ev.sparsity == pytest.approx(1 - round(N * 0.1) / N) and ev.test_acc > 0.2
