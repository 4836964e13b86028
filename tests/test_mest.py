"""MEST (pai_core/dynamic_methods/mest.py): one mutation against a hand computation (salience
|w| + λ|g|, random growth among all not kept, zero values and fresh state), the elastic ratio
schedule, EM&S's density above the target between updates and exactly at it after the last
decay point, masked weights staying zero, bit-exact resume with R_s, bad params refused by name
before compute, the config sharing RigL's init and mask, other configs' keys unchanged."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import ROOT, random_sparse_start, tiny_raw
from pai_core.catalog import catalog
from pai_core.dynamic_methods import dynamic_method_names, get_method
from pai_core.dynamic_methods.mest import MEST, MESTParams
from pai_core.dynamic_methods.tools import InTimeOverparam, generator, sample_inactive
from pai_core.paradigms import build_plan
from pai_core.paradigms.common import pretty
from pai_core.spec_io import SpecError, load_spec, parse_spec
from pai_core.specs import TrainSpec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.training import Callback, train

DYN = ROOT / "configs" / "dynamic"

# ------------------------------------------------------------------ registry, specs, keys

def test_mest_is_registered_listed_named_and_offered_by_the_form():
    from pai_core.paradigms.dynamic_sparse import DynamicSpec

    assert "mest" in dynamic_method_names() and get_method("mest").label == "MEST" and pretty("mest") == "MEST"
    listed = {name: what for kind, name, what in catalog() if kind.startswith("dynamic method")}
    assert "Yuan" in listed["mest"] and "em_s" in listed["mest"]
    assert "mest" in DynamicSpec.model_json_schema()["properties"]["method"]["enum"]


def test_the_config_shares_init_and_initial_mask_with_rigl_and_keys_its_resolved_params():
    ours, rigl = (build_plan(load_spec(DYN / f"{m}_lenet300_mnist.yaml")) for m in ("mest", "rigl"))
    assert [n.key for n in ours.nodes[:5]] == [n.key for n in rigl.nodes[:5]]  # init, pretrain, evaluate, score, mask
    rnd = ours.rounds[1]
    assert rnd.density == pytest.approx(0.05) and rnd.mask.fields["scope"] == "erk"
    assert rnd.trained.fields["dynamic"] == {"method": "mest", "params": {
        "variant": "em", "mutation_ratios": [0.2, 0.1, 0.0], "decay_fractions": [0.5625, 0.75],
        "interval_fraction": 0.03125, "lam": 0.5}}
    em_s = build_plan(load_spec(DYN / "mest_lenet300_mnist.yaml", ["dynamic.params.variant=em_s"]))
    assert em_s.rounds[1].mask.key == rnd.mask.key and em_s.rounds[1].trained.key != rnd.trained.key


def dyn_raw(params: dict | None = None, **fields) -> dict:
    return tiny_raw("dynamic_sparse", prune={"criterion": "random", "schedule": "one_shot", "sparsity": 0.9,
                                             "rate": None, "rounds": 1, "scope": "erk"},
                    dynamic={"method": "mest", **({"params": params} if params is not None else {}), **fields})


# (the tiny spec trains 40 iterations: ΔT = round(0.03125·40) = 1 by default, decay points at 22 and 30)
@pytest.mark.parametrize("params, field, says", [
    ({"variant": "ems"}, "variant", "Input should be 'em' or 'em_s' (got 'ems'); allowed: variant, mutation_ratios"),
    ({"mutation_ratios": [0.2, 0.1]}, "mutation_ratios", "2 ratios for 2 decay points; allowed: one more ratio "
                                                         "than decay_fractions"),
    ({"mutation_ratios": []}, "mutation_ratios", "at least 1 item"),
    ({"mutation_ratios": [0.2, 1.0, 0]}, "mutation_ratios.1", "Input should be less than 1 (got 1.0)"),
    ({"mutation_ratios": [0.2, -0.1, 0]}, "mutation_ratios.1", "greater than or equal to 0"),
    ({"mutation_ratios": 0.2}, "mutation_ratios", "valid tuple"),
    ({"mutation_ratios": [0, 0, 0]}, "mutation_ratios", "no mask update would happen"),
    ({"decay_fractions": [0.75, 0.5]}, "decay_fractions", "must increase (got 0.75, 0.5); allowed: strictly"),
    ({"decay_fractions": [0.5, 0.5]}, "decay_fractions", "must increase"),
    ({"decay_fractions": [0.5, 1.0]}, "decay_fractions.1", "less than 1"),
    ({"interval_fraction": 0}, "interval_fraction", "greater than 0"),
    ({"lam": -1}, "lam", "greater than or equal to 0"),
    ({"lam": float("nan")}, "lam", "finite number"),
    ({"variant": "em_s", "mutation_ratios": [0.2, 0.1, 0.1]}, "mutation_ratios",
     "em_s would end above the target density: its last ratio is 0.1; allowed: a last ratio of 0"),
    # ΔT = 5: updates at 0, 5, ..., 35; the last decay point int(0.9·40) = 36 has none at or after it
    ({"variant": "em_s", "interval_fraction": 0.125, "decay_fractions": [0.5, 0.9]}, "decay_fractions",
     "first update at or after the last decay point (iteration 36), and the last update is at 35 (every 5 of 40); "
     "allowed: a last decay fraction up to 0.875"),
    ({"interval": 5}, "interval", "unknown field; allowed: variant, mutation_ratios, decay_fractions"),
])
def test_a_bad_param_is_refused_naming_its_field(params, field, says):
    with pytest.raises(SpecError) as e:
        parse_spec(dyn_raw(params))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"dynamic.params.{field}: ") and says in msg, msg


def test_a_set_rigl_option_is_refused_and_the_cli_refuses_before_anything_runs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    with pytest.raises(SpecError, match=r"^dynamic.drop_fraction: a set/rigl option; mest takes its options"):
        parse_spec(dyn_raw({}, drop_fraction=0.5))
    monkeypatch.setenv("PAI_HOME", str(tmp_path / "home"))
    out = CliRunner().invoke(app, ["validate", str(DYN / "mest_lenet300_mnist.yaml"), "dynamic.params.variant=em_s",
                                   "dynamic.params.mutation_ratios=[0.2, 0.1, 0.05]"])
    assert out.exit_code == 2 and "dynamic.params.mutation_ratios: em_s would end above the target" in out.output
    assert not (tmp_path / "home" / "store").exists()
    with pytest.raises(ValueError, match="^params.decay_fractions: must increase"):  # built directly: same check
        MEST(MESTParams(decay_fractions=(0.7, 0.6)), 1000, 0)


MUTATIONS = {"null": None, "text": "x", "list": [1], "mapping": {"a": 1}, "negative": -1, "zero": 0,
             "2**70": 2**70, "nan": float("nan"), "inf": float("inf"), "huge": 1e300, "true": True}


@pytest.mark.parametrize("label", MUTATIONS)
def test_every_param_mutated_is_accepted_or_refused_naming_it(label):
    for field in MESTParams.model_fields:
        try:
            spec = parse_spec(dyn_raw({field: MUTATIONS[label]}))
        except SpecError as e:
            msg = str(e)
            assert msg.startswith(f"dynamic.params.{field}") and msg[len(f"dynamic.params.{field}")] in ":." \
                and "\n" not in msg, msg
            continue
        assert build_plan(spec).rounds[1].trained.fields["dynamic"]["params"][field] is not None


# ------------------------------------------------------------------ the schedule

def test_the_mutation_ratio_steps_down_at_the_decay_points_and_updates_come_every_interval():
    # T = 1000: ΔT = round(31.25) = 31; decay points int(562.5) = 562 and 750.
    p = MESTParams()
    assert p.interval(1000) == 31 and p.decay_iterations(1000) == [562, 750]
    assert [p.ratio_at(t, 1000) for t in (0, 558, 561, 562, 589, 744, 749, 750, 775, 999)] == \
        [0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0]
    cb = MEST(p, 1000, 0)
    assert [t for t in range(1000) if cb.due(t)] == list(range(0, 1000, 31))
    assert MESTParams(interval_fraction=1e-9).interval(1000) == 1


def one_layer(live=5, w=(0.30, -0.05, 0.0, 0.20, -0.10), g=(0.0, 0.1, 0.5, 0.0, 0.02)):
    """A 2×5 layer, the first `live` weights in the mask, with their weights and gradients; the
    dead ones have gradient 0.9 (it must not matter: they are not ranked for dropping)."""
    model = nn.Sequential(nn.Linear(5, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([*w, *[0.0] * (10 - len(w))]).reshape(2, 5))
    model[0].weight.grad = torch.tensor([*g, *[0.9] * (10 - len(g))]).reshape(2, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.state[model[0].weight]["momentum_buffer"] = torch.arange(1.0, 11.0).reshape(2, 5)
    return model, opt, {"0.weight": torch.tensor([True] * live + [False] * (10 - live)).reshape(2, 5)}


@pytest.mark.parametrize("lam, dropped", [(0.5, [1, 4]), (0.0, [1, 2])])
def test_one_em_mutation_drops_the_lowest_salience_and_grows_as_many_at_zero(lam, dropped):
    # n = 5, r = 0.4: k = 2. λ = 0.5: s = |w| + 0.5|g| = .30, .10, .25, .20, .11 -> drop w1, w4: w2, grown
    # at zero earlier, stays for its gradient. λ = 0 (the authors' code): |w| = .30 .05 0 .20 .10 -> w2, w1.
    model, opt, mask = one_layer()
    cb = MEST(MESTParams(mutation_ratios=(0.4,), decay_fractions=(), interval_fraction=0.01, lam=lam), 1000, 7)
    cb.on_start(type("S", (), {"mask": mask})())
    new = cb.update(100, model, opt, mask)["0.weight"].reshape(-1)
    kept = sorted(set(range(5)) - set(dropped))
    not_kept = torch.tensor([i not in kept for i in range(10)])
    grown = sample_inactive(~not_kept, 2, generator(7, 100), free=7).tolist()  # the draw (seed 7, update 100)
    assert new.nonzero().squeeze(1).tolist() == sorted(kept + grown) and int(new.sum()) == 5  # back to n exactly
    assert all(not_kept[i] for i in grown)
    w, buf = model[0].weight.detach().reshape(-1), opt.state[model[0].weight]["momentum_buffer"].reshape(-1)
    before = [0.30, -0.05, 0.0, 0.20, -0.10]
    assert [w[i].item() for i in kept] == pytest.approx([before[i] for i in kept])
    assert torch.count_nonzero(w[~new]) == 0 and all(w[i] == 0 for i in grown)  # dropped and grown: zero
    assert [buf[i].item() for i in kept] == [i + 1 for i in kept] and all(buf[i] == 0 for i in grown)
    assert cb.updates == [{"iteration": 100, "ratio": 0.4, "pruned": 2, "grown": 2,
                           "regrown": len(set(grown) & set(dropped)), "density": 0.5}]


def test_growth_is_uniform_over_every_position_not_kept_a_just_dropped_one_included():
    seen: dict[int, int] = {}
    for seed in range(300):
        model, opt, mask = one_layer()
        cb = MEST(MESTParams(mutation_ratios=(0.4,), decay_fractions=(), interval_fraction=0.01), 1000, seed)
        new = cb.update(0, model, opt, mask)["0.weight"].reshape(-1)
        for i in new.nonzero().squeeze(1).tolist():
            seen[i] = seen.get(i, 0) + 1
    assert seen[0] == seen[2] == seen[3] == 300  # kept every time
    candidates = [1, 4, 5, 6, 7, 8, 9]  # 2 of these 7 each time: 600 draws, ~86 each
    assert sorted(seen) == sorted([0, 2, 3, *candidates]) and all(50 < seen[i] < 125 for i in candidates)


def test_a_weight_dropped_and_regrown_in_one_update_restarts_at_zero_as_in_the_reference():
    # a full layer: the 2 dropped (w1 .05, w4 .10 by s = |w|, λ = 0) are the only positions to grow
    model, opt, mask = one_layer(live=10, w=(0.30, -0.05, 0.15, 0.20, -0.10, 0.5, 0.6, 0.7, 0.8, 0.9), g=(0.0,) * 10)
    cb = MEST(MESTParams(mutation_ratios=(0.2,), decay_fractions=(), interval_fraction=0.01, lam=0), 1000, 0)
    new = cb.update(0, model, opt, mask)["0.weight"]
    w, buf = model[0].weight.detach().reshape(-1), opt.state[model[0].weight]["momentum_buffer"].reshape(-1)
    assert bool(new.all()) and w[[1, 4]].tolist() == [0, 0] and buf[[1, 4]].tolist() == [0, 0]
    assert w[[0, 2, 3]].tolist() == pytest.approx([0.30, 0.15, 0.20]) and buf[[0, 2, 3]].tolist() == [1, 3, 4]
    assert cb.updates[0]["regrown"] == 2 and cb.updates[0]["pruned"] == cb.updates[0]["grown"] == 2


def test_em_s_grows_first_prunes_back_at_the_next_update_and_ends_at_the_target():
    # n = 4 of 10, r = 0.5 then 0 from iteration 50: k = 2; updates every 10.
    model, opt, mask = one_layer(live=4, w=(0.4, -0.3, 0.2, 0.1), g=(0.0,) * 4)
    cb = MEST(MESTParams(variant="em_s", mutation_ratios=(0.5, 0.0), decay_fractions=(0.5,), interval_fraction=0.1),
              100, 3)
    cb.on_start(type("S", (), {"mask": mask})())
    m0 = cb.update(0, model, opt, mask)  # iteration 0: nothing above n to drop, grow 2: 6 live, density 0.6
    live0 = m0["0.weight"].reshape(-1)
    assert int(live0.sum()) == 6 and live0[:4].all()
    assert cb.updates[-1] == {"iteration": 0, "ratio": 0.5, "pruned": 0, "grown": 2, "regrown": 0, "density": 0.6}
    # train stand-in: the two grown weights and the old ones get values and gradients
    grown0 = [i for i in live0.nonzero().squeeze(1).tolist() if i >= 4]
    with torch.no_grad():
        w = model[0].weight.view(-1)
        w[grown0[0]], w[grown0[1]] = 0.35, 0.01  # s = .35 and .01 + .5·.1 = .06
        g = model[0].weight.grad.view(-1)
        g[grown0[1]] = 0.1
    # iteration 10: drop back to 4 by s: .4 .3 .2 .1 (old), .35, .06 -> w3 (.1) and the second grown (.06) go
    m1 = cb.update(10, model, opt, m0)["0.weight"].reshape(-1)
    assert int(m1.sum()) == 6 and m1[[0, 1, 2, grown0[0]]].all()
    assert model[0].weight.view(-1)[grown0[0]].item() == pytest.approx(0.35)
    assert cb.updates[-1]["pruned"] == 2 and cb.updates[-1]["grown"] == 2 and cb.updates[-1]["density"] == 0.6
    # iteration 50, the decay point (r = 0): back to n = 4, none grown; after it nothing changes
    m5 = cb.update(50, model, opt, {"0.weight": m1.view(2, 5)})["0.weight"].reshape(-1)
    assert int(m5.sum()) == 4 and cb.updates[-1]["ratio"] == 0 and cb.updates[-1]["density"] == 0.4
    assert cb.update(60, model, opt, {"0.weight": m5.view(2, 5)}) is None and len(cb.updates) == 3


def test_em_changes_nothing_after_the_last_decay_point():
    model, opt, mask = one_layer()
    cb = MEST(MESTParams(mutation_ratios=(0.4, 0.0), decay_fractions=(0.5,), interval_fraction=0.1), 100, 0)
    assert cb.update(50, model, opt, mask) is None and cb.updates == []
    assert cb.update(40, model, opt, mask) is not None and cb.updates[-1]["ratio"] == 0.4


# ------------------------------------------------------------------ training: density, resume, R_s

class Watch(Callback):
    """After MEST's hook: each layer's live count at every iteration, and that no masked weight
    is nonzero after any step."""

    def __init__(self):
        self.counts, self.steps = {}, 0

    def after_backward(self, state):
        self.counts[state.it] = {n: int(m.sum()) for n, m in state.mask.items()}

    def on_step_end(self, state):
        params = dict(state.model.named_parameters())
        for n, m in state.mask.items():
            assert torch.count_nonzero(params[n].detach()[~m.to(params[n].device)]) == 0
        self.steps += 1


SGD = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=3)  # 60 iterations of 50
ADAM = TrainSpec(optimizer="adam", lr=1e-3, epochs=3)
# ΔT = 6: updates at 0, 6, ..., 54; r = 0.2 before iteration 30, 0.1 before 45, 0 from 45 (update 48 on)
SMALL = dict(mutation_ratios=(0.2, 0.1, 0.0), decay_fractions=(0.5, 0.75), interval_fraction=0.1)


def make(variant: str, seed: int = 11) -> InTimeOverparam:
    return InTimeOverparam(get_method("mest").build({"method": "mest", "params": {"variant": variant, **SMALL}},
                                                    60, seed))


@pytest.mark.parametrize("variant", ["em", "em_s"])
def test_the_density_is_exact_between_updates_em_s_above_it_by_the_ratio_until_the_last_decay(variant):
    data, model, mask = random_sparse_start(0, 0.1)
    n = {k: int(m.sum()) for k, m in mask.items()}
    cb, watch = make(variant), Watch()
    out = train(model, data, SGD, batch_size=50, order_seed=0, mask=mask, callbacks=[cb, watch])
    for it, counts in watch.counts.items():
        last = it // 6 * 6  # the update in force
        r = 0.2 if last < 30 else 0.1 if last < 45 else 0.0
        expected = n if variant == "em" else {k: n[k] + int(r * n[k] + 1e-9) for k in n}
        assert counts == expected, it
    assert {k: int(m.sum()) for k, m in out.mask.items()} == n and watch.steps == 60  # the target, exactly
    updates = cb.inner.updates
    assert [u["iteration"] for u in updates] == ([0, 6, 12, 18, 24, 30, 36, 42] if variant == "em" else
                                                 [0, 6, 12, 18, 24, 30, 36, 42, 48])
    assert all(u["pruned"] == u["grown"] > 0 for u in updates) if variant == "em" else \
        updates[0]["pruned"] == 0 and updates[-1]["grown"] == 0 and updates[-1]["pruned"] > 0
    rec = cb.record()
    assert rec["itop_rate"] > sum(n.values()) / sum(m.numel() for m in mask.values())  # R_s recorded, above d
    assert [h["iteration"] for h in rec["itop_history"]] == [u["iteration"] for u in updates]
    assert out.history[-1]["test_acc"] > 0.2  # chance: 0.1


class Crash(Callback):
    def after_backward(self, state):
        if state.it == 45:
            raise KeyboardInterrupt("simulated kill mid epoch 3, after epoch 2's checkpoint")


@pytest.mark.parametrize("spec, variant", [(SGD, "em_s"), (ADAM, "em")], ids=["sgd-em_s", "adam-em"])
def test_a_resumed_training_equals_an_uninterrupted_one_bit_for_bit(spec, variant, tmp_path):
    data, full, mask = random_sparse_start(0, 0.1)
    whole = make(variant)
    out = train(full, data, spec, batch_size=50, order_seed=1, mask=mask, callbacks=[whole])

    ckpt = tmp_path / "c.ckpt.pt"
    _, crashed, _ = random_sparse_start(0, 0.1)
    with pytest.raises(KeyboardInterrupt):
        train(crashed, data, spec, batch_size=50, order_seed=1, mask=mask, checkpoint=ckpt,
              callbacks=[make(variant), Crash()])
    saved = torch.load(ckpt, weights_only=True)
    assert saved["iteration"] == 40 and saved["callbacks"][0]["targets"] and saved["callbacks"][0]["itop"]["ever"]
    _, resumed, _ = random_sparse_start(0, 0.1)
    again = make(variant)  # a new process: the state comes only from the checkpoint
    out2 = train(resumed, data, spec, batch_size=50, order_seed=1, mask=mask, checkpoint=ckpt, callbacks=[again])
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    assert all(torch.equal(out.mask[n], out2.mask[n]) for n in mask)
    assert again.record() == whole.record() and "itop_rate" in again.record()
    assert [u["iteration"] for u in again.record()["mask_updates"]][-2:] == ([36, 42] if variant == "em" else [42, 48])


def test_the_plan_trains_evaluates_the_final_mask_and_stores_r_s(tmp_path):
    spec = parse_spec(dyn_raw({"variant": "em_s", "interval_fraction": 0.125}))  # ΔT 5; decay at 22, 30
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    start = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    final = rt.store.load(refs[plan.rounds[1].trained.key])["mask"]
    assert {n: int(m.sum()) for n, m in final.items()} == {n: int(m.sum()) for n, m in start.items()}
    info, ev = refs[plan.rounds[1].trained.key].info, refs[plan.rounds[1].evaluate.key].info
    assert [u["iteration"] for u in info.mask_updates] == [0, 5, 10, 15, 20, 25, 30]  # 30: back to the target
    assert info.mask_updates[-1]["grown"] == 0 and info.mask_updates[-2]["density"] > info.mask_updates[-1]["density"]
    kept, size = sum(int(m.sum()) for m in final.values()), sum(m.numel() for m in final.values())
    assert ev.sparsity == pytest.approx(1 - kept / size, abs=1e-3) and kept / size < info.itop_rate <= 1
