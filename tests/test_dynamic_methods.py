"""DeepR, DSR and SNFS (pai_core/dynamic_methods): each method's core rule against a hand
computation on tiny tensors, exact sparsity after every update, bit-exact resume, bad
options refused by name before compute, and SET/RigL's stage keys unchanged by the registry."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, random_sparse_start, tiny_raw
from pai_core.catalog import catalog
from pai_core.dynamic_methods import dynamic_method_names, get_method
from pai_core.dynamic_methods.deepr import DeepR, DeepRParams, initial_signs, rewire
from pai_core.dynamic_methods.dsr import DSR, DSRParams
from pai_core.dynamic_methods.snfs import SNFS, SNFSParams
from pai_core.dynamic_methods.tools import apportion, generator, sample_distinct, sample_inactive
from pai_core.masks import MaskEnforcer
from pai_core.paradigms import build_plan
from pai_core.paradigms.dynamic_sparse import DynamicSpec
from pai_core.spec_io import SpecError, load_spec, parse_spec
from pai_core.specs import TrainSpec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.training import Callback, TrainState, train

NEW = ("deepr", "dsr", "snfs")
DYN = ROOT / "configs" / "dynamic"


# ------------------------------------------------------------------ registry, specs, keys

def test_every_method_is_registered_listed_and_offered_by_the_form():
    assert set(dynamic_method_names()) == {"set", "rigl", "deepr", "dsr", "snfs", "granet", "mest",
                                            "topkast", "sr_ste"}
    listed = {name: what for kind, name, what in catalog() if kind.startswith("dynamic method")}
    assert set(listed) == set(dynamic_method_names())
    assert "Bellec" in listed["deepr"] and "Mostafa" in listed["dsr"] and "Dettmers" in listed["snfs"]
    assert "n_prune" in listed["dsr"] and "prune_rate" in listed["snfs"] and "temperature" in listed["deepr"]
    assert DynamicSpec.model_json_schema()["properties"]["method"]["enum"] == dynamic_method_names()
    assert [get_method(n).label for n in NEW] == ["DeepR", "DSR", "SNFS"]


# Computed with the code before the registry existed (commit 9ec0ddc): SET/RigL specs keep every key.
KEYS_BEFORE = {
    ("set", ()): ["8cc42ad981beb3a24757", "57d5dc76798b957cc191", "a92fc5aca01c641c4e98", "c41be2b13bb0597a907e",
                  "c2c260ff348ac20a6523", "54bf124762a4e041e124", "d32819d3067cfb81cd9e"],
    ("set", ("prune.sparsity=0.98", "seed=1")): [
        "8232157cf3908f131c3e", "aea52887df925432370a", "43216c5bdaf04a5ca10d", "f091116e318ee9287ccc",
        "5900cbb3bb3a7e350359", "b656e8c1735694ed3be2", "80b227a9424f0aaa0168"],
    ("rigl", ()): ["8cc42ad981beb3a24757", "57d5dc76798b957cc191", "a92fc5aca01c641c4e98", "c41be2b13bb0597a907e",
                   "c2c260ff348ac20a6523", "0a1448e6e07dac5f99d5", "746e7ab2f41dbe63a89f"],
    ("rigl", ("prune.sparsity=0.98", "seed=1")): [
        "8232157cf3908f131c3e", "aea52887df925432370a", "43216c5bdaf04a5ca10d", "f091116e318ee9287ccc",
        "5900cbb3bb3a7e350359", "01fefcd810b96ca7da88", "e9d30690b576bad04033"],
}


# Every node key of every dynamic config, pinned: each was computed with the code before the next
# method, or R_s (an output, not a key change), was added, so adding one keeps the others' artifacts.
SHARED = ["8cc42ad981beb3a24757", "57d5dc76798b957cc191", "a92fc5aca01c641c4e98", "c41be2b13bb0597a907e"]  # init, dense
ERK_95 = "c2c260ff348ac20a6523"  # the random ERK mask at 95 % every constant-density method starts from
CONFIG_KEYS = {  # the rest of each plan: its start mask, its sparse training, its evaluation
    "deepr": [*SHARED, ERK_95, "5a6a2f068617b5563920", "1c972649fa77ad8d9aaf"],
    "dsr": [*SHARED, ERK_95, "88e9ab1344b97d98d37b", "49e819953a8938194336"],
    "granet": [*SHARED, "4841a12b1372dc856729", "a984fa6033103a818150", "eb4676a1807a9442c0fb"],
    "granet_uniform": [*SHARED, "9abcae8c2241bbe97d75", "3953409bc573436ffa56", "a8a86d9bc36b7be8d757"],
    "mest": [*SHARED, ERK_95, "2c84185c34762c85e756", "9a128f276d44848823ff"],
    "rigl": [*SHARED, ERK_95, "0a1448e6e07dac5f99d5", "746e7ab2f41dbe63a89f"],
    "set": [*SHARED, ERK_95, "6dbb48f298fdc54bba65", "25e224dfa6000a6f43e2"],
    "snfs": [*SHARED, ERK_95, "0dc2d21a88ce62d16222", "5e70eaa791334f32a5bf"],
    "topkast": [*SHARED, ERK_95, "9126ec41074da61fe8c5", "665192c36ae3e8cce7fd"],
    "sr_ste": [*SHARED[:3], "402da293f6bdd74dce22", "485f1ad841875d1237aa",  # 2:4 by magnitude of the init
               "d0165314efded120643c", "5590e19f82bdf04dc5c4"],
}


def test_every_dynamic_config_is_pinned():
    assert sorted(CONFIG_KEYS) == sorted(p.name.removesuffix("_lenet300_mnist.yaml") for p in DYN.glob("*.yaml"))


@pytest.mark.parametrize("method", list(CONFIG_KEYS))
def test_dynamic_configs_keep_every_plan_key(method):
    spec = load_spec(DYN / f"{method}_lenet300_mnist.yaml")
    assert [n.key[:20] for n in build_plan(spec).nodes] == CONFIG_KEYS[method]


@pytest.mark.parametrize("method, overrides", list(KEYS_BEFORE))
def test_set_and_rigl_plan_keys_are_unchanged(method, overrides):
    """RigL keeps every key. SET's random growth now draws at the masked layer's std (its old
    draw diverged), so its sparse training and evaluation get new keys on purpose, and nothing
    before them changes."""
    spec = load_spec(DYN / f"{method}_lenet300_mnist.yaml", list(overrides))
    keys, before = [n.key for n in build_plan(spec).nodes], KEYS_BEFORE[(method, overrides)]
    if method == "rigl":
        assert keys == before
    else:
        assert keys[:5] == before[:5] and all(k != b for k, b in zip(keys[5:], before[5:]))


@pytest.mark.parametrize("method", NEW)
def test_new_configs_share_the_dense_round_and_the_initial_mask_with_set(method):
    ours = build_plan(load_spec(DYN / f"{method}_lenet300_mnist.yaml")).nodes
    theirs = build_plan(load_spec(DYN / "set_lenet300_mnist.yaml")).nodes
    assert [n.key for n in ours[:5]] == [n.key for n in theirs[:5]]  # init, pretrain, evaluate, score, mask
    assert ours[5].key != theirs[5].key and ours[5].fields["dynamic"]["method"] == method


def dyn_raw(method: str, params: dict | None = None, **fields) -> dict:
    return tiny_raw("dynamic_sparse", prune={"criterion": "random", "schedule": "one_shot", "sparsity": 0.9,
                                             "rate": None, "rounds": 1, "scope": "erk"},
                    dynamic={"method": method, **({"params": params} if params is not None else {}), **fields})


def test_the_train_key_holds_every_param_resolved():
    def key(params):
        return build_plan(parse_spec(dyn_raw("dsr", params))).rounds[1].trained
    default = key({"interval": 5})
    explicit, other = key({"interval": 5, "n_prune": 600, "delta": 0.1}), key({"interval": 5, "n_prune": 601})
    assert default.key == explicit.key != other.key
    assert default.fields["dynamic"] == {"method": "dsr", "params": {
        "n_prune": 600, "delta": 0.1, "threshold": 1e-3, "interval": 5, "end_fraction": 0.95}}


@pytest.mark.parametrize("method, params, fields, field, says", [
    ("deepr", {"alpha": -1}, {}, "dynamic.params.alpha", "greater than or equal to 0 (got -1); allowed: alpha, "
                                                          "temperature, revive_theta, end_fraction"),
    ("deepr", {"temperature": float("nan")}, {}, "dynamic.params.temperature", "finite number"),
    ("dsr", {"n_prune": 0}, {}, "dynamic.params.n_prune", "greater than 0"),
    ("dsr", {"delta": 1.5}, {}, "dynamic.params.delta", "less than 1"),
    ("dsr", {"treshold": 0.1}, {}, "dynamic.params.treshold", "unknown field; allowed: n_prune, delta, threshold"),
    ("dsr", {"interval": "often"}, {}, "dynamic.params.interval", "valid integer"),
    ("dsr", {"interval": 38}, {}, "dynamic.params.interval", "no mask update would happen: updates stop at "
                                                              "iteration 38 (end_fraction 0.95 of 40)"),
    ("snfs", {"prune_rate": 1.0}, {}, "dynamic.params.prune_rate", "less than 1"),
    ("snfs", {"interval": 0}, {}, "dynamic.params.interval", "greater than 0"),
    ("snfs", {"end_fraction": 0.5}, {}, "dynamic.params.end_fraction", "no mask update would happen"),
    ("snfs", {}, {"update_interval": 5}, "dynamic.update_interval", "a set/rigl option; snfs takes its options "
                                                                    "in dynamic.params"),
    ("dsr", {}, {"drop_fraction": 0.5}, "dynamic.drop_fraction", "a set/rigl option"),
    ("set", {"alpha": 1}, {"update_interval": 5}, "dynamic.params.alpha", "unknown field; allowed: none (set takes"),
    ("setr", None, {}, "dynamic.method", "unknown dynamic method 'setr'; allowed: deepr, dsr, granet, mest, rigl, set, snfs"),
])
def test_a_bad_option_is_refused_naming_its_field(method, params, fields, field, says):
    with pytest.raises(SpecError) as e:
        parse_spec(dyn_raw(method, params, **fields))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{field}: ") and says in msg, msg


def test_set_rigl_fields_at_their_defaults_are_accepted_with_any_method():
    """A form sends every field of the section; at its default a set/rigl option changes nothing."""
    defaults = {"update_interval": 100, "drop_fraction": 0.3, "end_fraction": 0.75, "anneal": None,
                "grow_init": None, "regrow_dropped": True, "skip_step_on_update": None}
    for method in NEW:
        spec = parse_spec(dyn_raw(method, {"interval": 5} if method == "dsr" else {}, **defaults))
        assert set(build_plan(spec).rounds[1].trained.fields["dynamic"]) == {"method", "params"}


MUTATIONS = {"null": None, "text": "x", "list": [1], "mapping": {"a": 1}, "negative": -1, "zero": 0,
             "2**70": 2**70, "nan": float("nan"), "inf": float("inf"), "huge": 1e300, "true": True}


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("label", MUTATIONS)
def test_every_param_mutated_is_accepted_or_refused_naming_it(method, label):
    for field in get_method(method).Params.model_fields:
        params = {"interval": 5} if method == "dsr" and field != "interval" else {}
        try:
            spec = parse_spec(dyn_raw(method, {**params, field: MUTATIONS[label]}))
        except SpecError as e:
            assert str(e).startswith(f"dynamic.params.{field}: ") and "\n" not in str(e), str(e)
            continue
        assert build_plan(spec).rounds[1].trained.fields["dynamic"]["params"][field] is not None or field == "interval"


def test_a_bad_override_is_refused_by_the_cli_before_anything_runs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    monkeypatch.setenv("PAI_HOME", str(tmp_path / "home"))
    out = CliRunner().invoke(app, ["validate", str(DYN / "dsr_lenet300_mnist.yaml"), "dynamic.params.delta=-0.1"])
    assert out.exit_code == 2 and "dynamic.params.delta: Input should be greater than 0" in out.output
    assert not (tmp_path / "home" / "store").exists()


# ------------------------------------------------------------------ shared tools

def test_apportion_is_proportional_exact_and_capped():
    assert apportion(7, [5, 3, 2], [10, 10, 10]) == [4, 2, 1]  # quotas 3.5, 2.1, 1.4: floors 6, +1 to .5
    assert apportion(2, [1, 1, 1], [5, 5, 5]) == [1, 1, 0]  # equal remainders: lower index first
    assert apportion(10, [1, 1], [2, 100]) == [2, 8]  # the capped layer's rest goes to the other
    assert apportion(10, [0.0, 0.0], [3, 3]) == [3, 3]  # more than fits: what fits
    assert apportion(3, [0.0, 0.0], [9, 9]) == [2, 1]  # no weight: equal shares
    assert apportion(0, [1.0], [4]) == [0]


def test_sample_distinct_is_uniform_distinct_and_seeded():
    picks = [sample_distinct(1000, 7, generator(s, 3)) for s in range(300)]
    assert all(len(set(p.tolist())) == 7 and p.min() >= 0 and p.max() < 1000 for p in picks)
    assert torch.equal(sample_distinct(1000, 7, generator(5, 3)), picks[5])
    counts = torch.bincount(torch.cat([sample_distinct(5, 1, generator(s, 0)) for s in range(500)]), minlength=5)
    assert counts.min() > 60 and counts.max() < 140  # 100 expected each
    assert sorted(sample_distinct(6, 6, generator(0, 0)).tolist()) == list(range(6))


def test_sample_inactive_draws_only_free_positions_uniformly():
    active = torch.arange(1000) % 4 != 0  # 250 free: multiples of 4
    hits = torch.zeros(1000, dtype=torch.long)
    for s in range(400):
        got = sample_inactive(active, 5, generator(s, 0))  # the rejection path: 8·5 < 250
        assert len(set(got.tolist())) == 5 and not active[got].any()
        hits[got] += 1
    assert hits[active].sum() == 0 and hits.sum() == 2000
    assert hits[~active].float().std().item() < 4 * math.sqrt(8)  # 8 expected per position, Poisson-like spread
    few = torch.ones(1000, dtype=torch.bool)
    few[[997, 998]] = False  # 2 free positions, 2 to draw: the list path
    assert sorted(sample_inactive(few, 2, generator(0, 0)).tolist()) == [997, 998]


# ------------------------------------------------------------------ DeepR

def one_layer(weights, active, momentum=None):
    """A 2x4 linear layer (8 connections) with SGD; `momentum` fills its momentum buffer."""
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(weights, dtype=torch.float32).reshape(2, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if momentum is not None:
        opt.state[model[0].weight]["momentum_buffer"] = torch.tensor(momentum, dtype=torch.float32).reshape(2, 4)
    return model, opt, {"0.weight": torch.tensor(active).reshape(2, 4)}


SIGN = torch.tensor([1, 1, -1, -1, 1, -1, 1, -1], dtype=torch.int8).reshape(2, 4)


def test_deepr_signs_come_from_the_initial_weights_and_a_seeded_coin():
    model, _, mask = one_layer([0.3, -0.2, 0.5, -0.1, 0, 0, 0, 0], [True] * 4 + [False] * 4)
    signs = initial_signs(model, mask, generator(1, 0))["0.weight"].reshape(-1)
    assert signs[:4].tolist() == [1, -1, 1, -1] and set(signs[4:].tolist()) <= {-1, 1}
    again = initial_signs(model, mask, generator(1, 0))["0.weight"].reshape(-1)
    assert torch.equal(signs, again)
    coins = torch.cat([initial_signs(model, mask, generator(s, 0))["0.weight"].reshape(-1)[4:] for s in range(100)])
    assert 140 < int((coins == 1).sum()) < 260  # 200 expected


@pytest.mark.parametrize("seed", range(6))
def test_deepr_a_sign_flip_kills_that_connection_and_one_dormant_is_revived(seed):
    # active 0..3; after the step, w1 = -0.01 has crossed zero against its sign +1, the others have not.
    after = [0.3, -0.01, -0.2, -0.4, 0, 0, 0, 0]
    model, opt, mask = one_layer(after, [True] * 4 + [False] * 4, momentum=[1.0] * 8)
    new, killed, revived = rewire(model, opt, mask, {"0.weight": SIGN}, DeepRParams(), 0.0,
                                  generator(seed, 7, 1), generator(seed, 7, 2))
    now, w = new["0.weight"].reshape(-1), model[0].weight.detach().reshape(-1)
    buf = opt.state[model[0].weight]["momentum_buffer"].reshape(-1)
    assert killed == revived == 1 and int(now.sum()) == 4
    assert now[[0, 2, 3]].all() and w[[0, 2, 3]].tolist() == pytest.approx([0.3, -0.2, -0.4])
    (r,) = [i for i in range(8) if now[i] and i not in (0, 2, 3)]
    assert r in (1, 4, 5, 6, 7)  # any dormant connection, the one just killed included (as the reference)
    assert w[r].item() == pytest.approx(SIGN.reshape(-1)[r].item() * 1e-12, rel=1e-6) and buf[r] == 0
    if r != 1:
        assert w[1] == 0 and not now[1]
    assert buf[[0, 2, 3]].tolist() == [1.0, 1.0, 1.0]


def test_deepr_revives_uniformly_among_the_dormant():
    hits = torch.zeros(8, dtype=torch.long)
    for seed in range(400):
        model, opt, mask = one_layer([0.3, -0.01, -0.2, -0.4, 0, 0, 0, 0], [True] * 4 + [False] * 4)
        new, _, _ = rewire(model, opt, mask, {"0.weight": SIGN}, DeepRParams(), 0.0,
                           generator(seed, 0, 1), generator(seed, 0, 2))
        hits += (new["0.weight"] & ~torch.tensor([True, False, True, True] + [False] * 4).reshape(2, 4)).reshape(-1)
    assert hits[[0, 2, 3]].tolist() == [0, 0, 0] and int(hits.sum()) == 400
    assert hits[[1, 4, 5, 6, 7]].min() > 50 and hits[[1, 4, 5, 6, 7]].max() < 110  # 80 expected each


def test_deepr_noise_has_std_sqrt_2_eta_t_and_touches_only_active_connections():
    model = nn.Sequential(nn.Linear(200, 100, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # far from zero: nothing dies
    mask = {"0.weight": torch.arange(20000).reshape(100, 200) % 2 == 0}
    sign = {"0.weight": torch.ones(100, 200, dtype=torch.int8)}
    eta, temperature = 0.5, 1e-4
    new, killed, _ = rewire(model, torch.optim.SGD(model.parameters(), lr=eta), mask, sign,
                            DeepRParams(temperature=temperature), math.sqrt(2 * eta * temperature),
                            generator(0, 0, 1), generator(0, 0, 2))
    moved = model[0].weight.detach() - 1.0
    assert killed == 0 and new is mask
    assert torch.all(moved[~mask["0.weight"]] == 0)
    assert moved[mask["0.weight"]].std().item() == pytest.approx(math.sqrt(2 * eta * temperature), rel=0.05)


def hooks_step(cb, model, opt, state, x, y):
    """One iteration of the training loop's hook order, as pai_core.training.train runs it."""
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    before = state.mask
    cb.after_backward(state)
    enforcer = MaskEnforcer(model, state.mask)
    rebuilt = state.mask is not before
    enforcer.before_step()
    opt.step()
    enforcer.after_step()
    state.it += 1
    cb.on_step_end(state)
    return rebuilt


def test_deepr_one_sgd_step_is_the_papers_update():
    # θ ← θ − η(∂E/∂θ + α) on the active connections, w = s·θ; then a crossing dies.
    torch.manual_seed(0)
    w0 = [0.5, 0.02, -0.3, -0.4, 0.0, 0.0, 0.0, 0.0]
    model, _, mask = one_layer(w0, [True] * 4 + [False] * 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0])
    p = model[0].weight
    grad = torch.autograd.grad(F.cross_entropy(model(x), y), p)[0].reshape(-1)
    alpha, s = 0.5, SIGN.reshape(-1).float()
    expected = torch.tensor(w0) - 0.1 * (grad + alpha * s)  # active entries; w1 = 0.02 − 0.1·(g + 0.5)
    assert s[1] * expected[1] < 0, "the hand example makes w1 cross zero"
    cb = DeepR(DeepRParams(alpha=alpha, temperature=0.0), end_iter=10, seed=3)
    state = TrainState(model, opt, mask, 0, 10, 10, 10)
    cb.sign = {"0.weight": SIGN.clone()}
    hooks_step(cb, model, opt, state, x, y)
    now, w = state.mask["0.weight"].reshape(-1), p.detach().reshape(-1)
    assert w[[0, 2, 3]].tolist() == pytest.approx(expected[[0, 2, 3]].tolist(), abs=1e-7)
    assert int(now.sum()) == 4 and cb.killed == cb.revived == 1 and cb.pending
    assert not now[1] or w[1].item() == pytest.approx(1e-12, rel=1e-6)
    mask_after_step = state.mask
    rebuilt = hooks_step(cb, model, opt, state, x, y)  # the next after_backward hands the new mask over
    assert rebuilt and not (cb.pending and state.mask is mask_after_step)


# ------------------------------------------------------------------ DSR

def two_layers(wa, wb, active_a, active_b):
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 5, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(wa).reshape(4, 5))
        model[1].weight.copy_(torch.tensor(wb).reshape(5, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.ones_like(p)
    mask = {"0.weight": torch.tensor(active_a).reshape(4, 5), "1.weight": torch.tensor(active_b).reshape(5, 4)}
    return model, opt, mask


def dsr_example():
    # A: 10 active, 4 below H = 1e-3 -> 6 survive; B: 10 active, 6 below -> 4 survive. K = 10.
    wa = [1e-4] * 4 + [0.5] * 6 + [0.0] * 10
    wb = [-2e-4] * 6 + [0.7] * 4 + [0.0] * 10
    first_ten = [True] * 10 + [False] * 10
    return two_layers(wa, wb, first_ten, first_ten)


@pytest.mark.parametrize("n_prune, next_threshold", [(5, 5e-4), (9, 5e-4), (10, 1e-3), (11, 1e-3), (12, 2e-3),
                                                     (20, 2e-3)])
def test_dsr_threshold_halves_above_and_doubles_below_the_target(n_prune, next_threshold):
    model, opt, mask = dsr_example()
    dsr = DSR(DSRParams(n_prune=n_prune, delta=0.1), end_iter=1000, seed=0)
    dsr.update(100, model, opt, mask)
    # K = 10: above (1 + δ)·Np halves (Np 5: 5.5, Np 9: 9.9); below (1 − δ)·Np doubles (Np 12: 10.8, Np 20: 18);
    # within [0.9·Np, 1.1·Np] stays (Np 10, 11)
    assert dsr.updates[-1] == {"iteration": 100, "threshold": 1e-3, "pruned": 10, "grown": 10}
    assert dsr.threshold == pytest.approx(next_threshold)


def test_dsr_regrows_in_proportion_to_each_layers_survivors():
    model, opt, mask = dsr_example()
    new = DSR(DSRParams(), end_iter=1000, seed=4).update(100, model, opt, mask)
    a, b = new["0.weight"].reshape(-1), new["1.weight"].reshape(-1)
    # K = 10 regrown as 10·6/10 = 6 in A and 10·4/10 = 4 in B: A 6 + 6 = 12, B 4 + 4 = 8, total 20
    assert int(a.sum()) == 12 and int(b.sum()) == 8
    assert not a[:4].any() and a[4:10].all() and int(a[10:].sum()) == 6  # grown among the inactive before
    assert not b[:6].any() and b[6:10].all() and int(b[10:].sum()) == 4  # never the ones pruned just now
    for p, m in zip(model.parameters(), (a, b)):
        w, buf = p.detach().reshape(-1), opt.state[p]["momentum_buffer"].reshape(-1)
        assert torch.all(w[~m] == 0)
        born = m.clone()
        born[:10] = False
        assert torch.all(w[born] == 0) and torch.all(buf[born] == 0)  # zero-initialised, fresh state
    again = DSR(DSRParams(), end_iter=1000, seed=4).update(100, *dsr_example())
    assert all(torch.equal(new[n], again[n]) for n in new), "the positions depend on (seed, iteration) only"


def test_dsr_never_empties_a_layer_and_keeps_its_largest_weight():
    wa = [1e-5, 5e-4, 2e-4] + [0.0] * 17
    wb = [0.5] * 10 + [0.0] * 10
    model, opt, mask = two_layers(wa, wb, [True] * 3 + [False] * 17, [True] * 10 + [False] * 10)
    new = DSR(DSRParams(), end_iter=1000, seed=0).update(5, model, opt, mask)
    a = new["0.weight"].reshape(-1)
    assert a[1] and not a[0] and not a[2]  # 5e-4 is the largest below H: it stays
    # K = 2 split by survivors 1 : 10 -> 0.18 and 1.82: floors 0 and 1, the remaining unit to B (.82 > .18)
    assert int(a.sum()) == 1 and int(new["1.weight"].sum()) == 12


# ------------------------------------------------------------------ SNFS

def snfs_example():
    wa = [0.4, 0.1, 0.3, 0.2, 0, 0, 0, 0]
    wb = [0.5, 0.6, 0.05, 0.7, 0, 0, 0, 0]
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(wa).reshape(2, 4))
        model[1].weight.copy_(torch.tensor(wb).reshape(4, 2))
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        opt.state[p].update(step=torch.tensor(3.0), exp_avg=torch.ones_like(p), exp_avg_sq=torch.ones_like(p))
    first_four = [True] * 4 + [False] * 4
    mask = {"0.weight": torch.tensor(first_four).reshape(2, 4), "1.weight": torch.tensor(first_four).reshape(4, 2)}
    snfs = SNFS(SNFSParams(prune_rate=0.5, final_prune_rate=0.5), total=1000)  # p = 0.5 throughout
    snfs.momentum = {"0.weight": torch.tensor([1.0, 2.0, 3.0, 2.0, 5.0, 0.5, 4.0, 0.1]).reshape(2, 4),
                     "1.weight": torch.tensor([1.0, 1.0, 1.0, 1.0, 0.2, 0.3, 9.0, 0.1]).reshape(4, 2)}
    return model, opt, mask, snfs


def test_snfs_layer_budgets_from_mean_momentum_and_growth_where_momentum_is_largest():
    model, opt, mask, snfs = snfs_example()
    new = snfs.update(100, model, opt, mask)
    # prune ⌈0.5·4⌉ = 2 per layer: A drops w1 = 0.1, w3 = 0.2; B drops w2 = 0.05, w0 = 0.5. R = 4.
    # mean |momentum| over active: A (1+2+3+2)/4 = 2, B 1 -> shares 2/3, 1/3 -> quotas 2.67, 1.33 -> A 3, B 1.
    # A grows the 3 largest |m| not kept {1: 2, 3: 2, 4: 5, 5: .5, 6: 4, 7: .1}: 4, 6, then 1 (tie with 3: lower index)
    # B grows the largest not kept {0: 1, 2: 1, 4: .2, 5: .3, 6: 9, 7: .1}: 6
    a, b = new["0.weight"].reshape(-1), new["1.weight"].reshape(-1)
    assert a.nonzero().squeeze(1).tolist() == [0, 1, 2, 4, 6]
    assert b.nonzero().squeeze(1).tolist() == [1, 3, 6]
    wa, wb = model[0].weight.detach().reshape(-1), model[1].weight.detach().reshape(-1)
    assert wa.tolist() == pytest.approx([0.4, 0.1, 0.3, 0, 0, 0, 0, 0])  # w1 regrown: keeps its value
    assert wb.tolist() == pytest.approx([0, 0.6, 0, 0.7, 0, 0, 0, 0])
    ea, eb = opt.state[model[0].weight]["exp_avg"].reshape(-1), opt.state[model[1].weight]["exp_avg"].reshape(-1)
    assert ea[[4, 6]].tolist() == [0, 0] and ea[1] == 1 and eb[6] == 0  # new: fresh state; regrown keeps its own
    assert snfs.updates == [{"iteration": 100, "prune_rate": 0.5, "moved": 4, "regrown": 1}]


def test_snfs_prune_rate_is_cosine_decayed_over_training():
    p = SNFSParams()
    assert [p.rate(t, 1000) for t in (0, 500, 1000)] == pytest.approx([0.5, 0.2525, 0.005])


def test_snfs_momentum_is_the_dense_gradients_moving_average():
    model, opt, mask, _ = snfs_example()
    snfs = SNFS(SNFSParams(momentum=0.9), total=1000)
    state = TrainState(model, opt, mask, 1, 1000, 1000, 100)
    g1, g2 = torch.arange(8.0).reshape(2, 4), torch.ones(2, 4)
    for g in (g1, g2):
        model[0].weight.grad, model[1].weight.grad = g.clone(), g.reshape(4, 2).clone()
        snfs.after_backward(state)
    # m = 0.9·(0.1·g1) + 0.1·g2, inactive entries included (the gradient is dense in after_backward)
    assert snfs.momentum["0.weight"].reshape(-1).tolist() == pytest.approx((0.09 * g1 + 0.1 * g2).reshape(-1).tolist())


# ------------------------------------------------------------------ training: exact sparsity, resume

def sparse_start(seed=0, density=0.1):
    return random_sparse_start(seed, density)


def make(method: str, total: int, seed: int = 11) -> Callback:
    params = {"deepr": {"alpha": 1e-4, "temperature": 1e-8}, "dsr": {"interval": 5, "n_prune": 300},
              "snfs": {}}[method]
    return get_method(method).build({"method": method, "params": params}, total, seed)


class Exact(Callback):
    """After every step: the same number of weights in the mask (per layer for DeepR), none outside it."""

    def __init__(self, per_layer: bool):
        self.per_layer, self.steps, self.moved = per_layer, 0, 0

    def on_start(self, state):
        self.start = {n: m.clone() for n, m in state.mask.items()}

    def on_step_end(self, state):
        params = dict(state.model.named_parameters())
        counts = {n: int(m.sum()) for n, m in state.mask.items()}
        assert sum(counts.values()) == sum(int(m.sum()) for m in self.start.values())
        if self.per_layer:
            assert counts == {n: int(m.sum()) for n, m in self.start.items()}
        for n, m in state.mask.items():
            assert torch.count_nonzero(params[n].detach()[~m.to(params[n].device)]) == 0
        self.steps += 1
        self.moved = sum(int((m != self.start[n]).sum()) for n, m in state.mask.items())


SGD = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, epochs=3)
ADAM = TrainSpec(optimizer="adam", lr=1e-3, epochs=3)


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("spec", [SGD, ADAM], ids=["sgd", "adam"])
def test_sparsity_is_exact_after_every_step_and_the_mask_moves(method, spec):
    data, model, mask = sparse_start()
    check = Exact(per_layer=method == "deepr")
    cb = make(method, 60)
    out = train(model, data, spec, batch_size=50, order_seed=0, mask=mask, callbacks=[cb, check])
    assert check.steps == 60 and check.moved > 0 and out.history[-1]["test_acc"] > 0.2  # chance: 0.1
    assert cb.updates and (method != "snfs" or [u["iteration"] for u in cb.updates] == [20, 40])


class Crash(Callback):
    def after_backward(self, state):
        if state.it == 45:
            raise KeyboardInterrupt("simulated kill mid epoch 3, after epoch 2's checkpoint")


@pytest.mark.parametrize("method", NEW)
def test_a_resumed_training_equals_an_uninterrupted_one_bit_for_bit(method, tmp_path):
    spec = ADAM if method == "snfs" else SGD
    data, full, mask = sparse_start()
    whole = make(method, 60)
    out = train(full, data, spec, batch_size=50, order_seed=1, mask=mask, callbacks=[whole])

    ckpt = tmp_path / "c.ckpt.pt"
    _, crashed, _ = sparse_start()
    with pytest.raises(KeyboardInterrupt):
        train(crashed, data, spec, batch_size=50, order_seed=1, mask=mask, checkpoint=ckpt,
              callbacks=[make(method, 60), Crash()])
    assert torch.load(ckpt, weights_only=True)["iteration"] == 40
    _, resumed, _ = sparse_start()
    again = make(method, 60)  # a new process: the state comes only from the checkpoint
    out2 = train(resumed, data, spec, batch_size=50, order_seed=1, mask=mask, checkpoint=ckpt, callbacks=[again])
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    assert all(torch.equal(out.mask[n], out2.mask[n]) for n in mask)
    assert again.record() == whole.record() and again.record()["mask_updates"]


@pytest.mark.parametrize("method", [*NEW, "topkast"])
def test_the_plan_trains_and_evaluates_with_the_final_mask(tmp_path, method):
    params = {"deepr": {}, "dsr": {"interval": 5, "n_prune": 300}, "snfs": {}, "topkast": {"update_interval": 5}}[method]
    spec = parse_spec(dyn_raw(method, params))
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    trained = rt.store.load(refs[plan.rounds[1].trained.key])
    start = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    assert any(not torch.equal(trained["mask"][n], start[n]) for n in start)
    ev, info = refs[plan.rounds[1].evaluate.key].info, refs[plan.rounds[1].trained.key].info
    assert ev.sparsity == pytest.approx(0.9, abs=2e-3) and ev.test_acc > 0.2 and info.mask_updates
