"""Instability analysis (Frankle et al. 2020): the interpolation itself against hand
computations, the spec's refusals, the plan's sharing with LTH, and a tracked run."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import tiny_raw
from pai_core import interpolation
from pai_core.executor import InProcess, Job, execute
from pai_core.paradigms import build_plan
from pai_core.paradigms.instability import NOISE_SEED_OFFSET
from pai_core.spec_io import SpecError, parse_spec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.training import evaluate


def raw(**over) -> dict:
    base = tiny_raw("instability", instability={"rewind_iters": [0, 3], "alphas": 5, "splits": ["val", "test"]},
                    prune={"rate": 0.5, "rounds": 2})
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return {k: v for k, v in base.items() if v is not None}


# ---------------------------------------------------------------- the interpolation itself

def test_alphas_hold_both_ends_evenly_spaced():
    assert interpolation.alphas(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="instability.alphas"):
        interpolation.alphas(1)


def test_interpolated_state_is_exact_at_both_ends_and_the_mean_in_between():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(7, 5, generator=g), "n": torch.tensor(3)}
    b = {"w": torch.randn(7, 5, generator=g), "n": torch.tensor(9)}
    assert torch.equal(interpolation.interpolate_state(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolation.interpolate_state(a, b, 1.0)["w"], b["w"])  # no a + (b - a) rounding
    mid = interpolation.interpolate_state(a, b, 0.25)
    torch.testing.assert_close(mid["w"], 0.75 * a["w"] + 0.25 * b["w"], rtol=0, atol=1e-6)
    assert mid["n"].item() == 3 and interpolation.interpolate_state(a, b, 0.75)["n"].item() == 9
    with pytest.raises(ValueError, match="differ in their tensors"):
        interpolation.interpolate_state(a, {"w": b["w"]}, 0.5)


def test_barrier_is_the_rise_above_the_mean_of_the_ends():
    assert interpolation.barrier([0.10, 0.30, 0.20]) == pytest.approx(0.15)
    assert interpolation.barrier([0.2, 0.1, 0.2]) == pytest.approx(0.0)  # a dip is no barrier: the ends bound it


def test_path_measures_each_interpolated_net_with_the_mask_held():
    """A linear layer's weight sum is linear in α: the path's rows are the hand values, and the
    masked entry is zero at every α."""
    net = nn.Linear(3, 2, bias=False)
    a, b = {"weight": torch.ones(2, 3)}, {"weight": 3 * torch.ones(2, 3)}
    mask = {"weight": torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])}
    seen = []

    def measure(m):
        seen.append(m.weight[0, 2].item())
        return {"sum": m.weight.sum().item()}

    rows = interpolation.path(net, a, b, [0.0, 0.5, 1.0], measure, mask=mask)
    assert [r["sum"] for r in rows] == [5.0, 10.0, 15.0]  # 5 live weights at 1, 2, 3
    assert seen == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="instability.bn_stats"):
        interpolation.path(net, a, b, [0.0], measure, bn_stats="reset")


def test_recomputed_batchnorm_statistics_are_the_plain_average_over_the_batches():
    bn = nn.BatchNorm1d(2, momentum=0.1)
    net = nn.Sequential(bn)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 2, generator=g) * 3 + 1, None) for _ in range(3)]
    assert interpolation.recompute_bn(net.eval(), batches) == 3
    x = torch.stack([b[0] for b in batches])
    torch.testing.assert_close(bn.running_mean, x.mean(dim=(0, 1)))
    torch.testing.assert_close(bn.running_var, x.var(dim=1, unbiased=True).mean(0))
    assert bn.momentum == 0.1 and not net.training  # restored


# ---------------------------------------------------------------- the spec

@pytest.mark.parametrize("over, field", [
    ({"instability": {"rewind_iters": [0, 10_000]}}, "instability.rewind_iters"),
    ({"instability": {"rewind_iters": [0, 3, 3]}}, "instability.rewind_iters"),
    ({"instability": {"splits": ["test", "test"]}}, "instability.splits"),
    ({"instability": {"rounds": [3]}}, "instability.rounds"),
    ({"instability": {"bn_stats": "recompute"}}, "instability.bn_stats"),  # LeNet has no BatchNorm
    ({"instability": {"alphas": 1}}, "alphas"),
    ({"prune": None, "instability": {"rounds": [0, 1]}}, "instability.rounds"),
    ({"prune": None, "retrain": {"optimizer": "sgd", "lr": 0.01, "epochs": 1}}, "retrain"),
])
def test_bad_instability_specs_are_refused_by_field(over, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_spec(raw(**over))


# ---------------------------------------------------------------- the plan

def test_first_copies_are_lth_nodes_and_second_copies_differ_only_by_their_noise():
    spec = parse_spec(raw())
    plan = build_plan(spec)
    assert [r.name for r in plan.rounds] == ["k=0 dense", "k=0 round 1", "k=0 round 2",
                                             "k=3 dense", "k=3 round 1", "k=3 round 2"]
    for k in (0, 3):
        lth = build_plan(parse_spec(tiny_raw(prune={"rate": 0.5, "rounds": 2, "rewind_iter": k})))
        rows = [r for r in plan.rounds if r.rewind_iter == k]
        assert [r.trained.key for r in rows] == [r.trained.key for r in lth.rounds]   # pretrain, then LTH's retrains
        assert [r.evaluate.key for r in rows] == [r.evaluate.key for r in lth.rounds]
        for r in rows:
            a, b = r.analysis.inputs["a"], r.analysis.inputs["b"]
            assert a is r.trained
            assert b.fields["data"]["order_seed"] == spec.order_seed + NOISE_SEED_OFFSET
            assert {**b.fields, "data": {**b.fields["data"], "order_seed": spec.order_seed}} == r.trained.fields
            # the second copy starts where LTH's retrain does: w_k (init at k = 0)
            assert b.inputs["start"].key == (rows[1].trained.inputs["start"].key)
            assert (b.inputs.get("mask") and b.inputs["mask"].key) == (r.mask and r.mask.key)


def test_rounds_picks_the_rows_and_a_noise_seed_is_taken_as_given():
    spec = parse_spec(raw(instability={"rounds": [0, 2], "noise_seed": 5}))
    plan = build_plan(spec)
    assert [r.name for r in plan.rounds] == ["k=0 dense", "k=0 round 2", "k=3 dense", "k=3 round 2"]
    assert {r.analysis.inputs["b"].fields["data"]["order_seed"] for r in plan.rounds} == {5}


def test_bn_stats_enter_the_path_key_only_for_nets_with_batchnorm():
    plain = build_plan(parse_spec(raw(prune=None)))
    assert "bn" not in plain.rounds[0].analysis.fields
    conv = {"model": {"name": "conv2", "batch_norm": True}}
    inter = build_plan(parse_spec(raw(prune=None, **conv)))
    recomp = build_plan(parse_spec(raw(prune=None, instability={"bn_stats": "recompute"}, **conv)))
    for x, y in zip(inter.rounds, recomp.rounds):
        assert x.trained.key == y.trained.key and x.analysis.inputs["b"].key == y.analysis.inputs["b"].key
        assert x.analysis.key != y.analysis.key  # only the paths are computed again


# ---------------------------------------------------------------- running it

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    spec = parse_spec(raw())
    store = Store(tmp_path_factory.mktemp("inst") / "store")
    rt = Runtime(store, device="cpu")
    plan = build_plan(spec)
    refs = run_plan(plan.nodes, rt)
    return spec, plan, store, refs


def test_the_path_ends_are_the_two_copies_own_evaluations(finished):
    spec, plan, store, refs = finished
    from pai_core.stages.common import build_arch, bundle_for

    for r in plan.rounds:
        info = refs[r.analysis.key].info
        assert len(info.path) == 5 and info.path[0]["alpha"] == 0.0 and info.path[-1]["alpha"] == 1.0
        ev = refs[r.evaluate.key].info
        assert info.path[0]["test_err"] == pytest.approx(1 - ev.test_acc, abs=1e-12)
        assert info.path[0]["val_err"] == pytest.approx(1 - ev.val_acc, abs=1e-12)
        b_ref = refs[r.analysis.inputs["b"].key]
        net = build_arch(b_ref.info.arch)
        net.load_state_dict(store.load(b_ref)["model"])
        data = bundle_for(r.analysis.fields["data"], Runtime(store, device="cpu"))
        assert info.path[-1]["test_err"] == pytest.approx(1 - evaluate(net, data.test)["acc"], abs=1e-12)
        errs = [p["test_err"] for p in info.path]
        assert info.instability["test"] == pytest.approx(max(errs) - (errs[0] + errs[-1]) / 2)
        assert info.distance > 0  # two different trainings
        if r.mask is not None:  # the second copy kept the mask
            mask = store.load(refs[r.mask.key])["mask"]
            b = store.load(b_ref)["model"]
            assert all(torch.all(b[n][m == 0] == 0) for n, m in mask.items())


def test_a_training_continued_from_w_k_replays_the_pretraining_bit_for_bit(finished):
    """Why the dense row's first copy may be the pretraining itself."""
    from pai_core.plan import train_node

    spec, plan, store, refs = finished
    row = next(r for r in plan.rounds if r.name == "k=3 dense")
    w_k = row.analysis.inputs["b"].inputs["start"]
    replay = train_node(spec, "replay", w_k, spec.train)
    refs_now = run_plan([w_k.inputs["start"], w_k, replay], Runtime(store, device="cpu"))  # w_k: stored
    got = store.load(refs_now[replay.key])["model"]
    want = store.load(refs[row.trained.key])["model"]
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_rerun_computes_nothing(finished):
    spec, plan, store, refs = finished
    rt = Runtime(store, device="cpu")
    run_plan(plan.nodes, rt)
    assert rt.computed == []


def test_tracking_logs_each_row_once_with_its_path(pai_home):
    """Rows sharing their weights (the dense net at each k) are separate MLflow runs, each
    with its own path and barriers; the report draws the instability figure."""
    from flows.env import mlflow_client
    from flows.tracking import Tracking
    from pai_core.report import write_report

    spec = parse_spec(raw(prune=None))
    store = Store(pai_home / "store")
    job = Job(spec, build_plan(spec))
    tracking = Tracking([job], store, None)
    out = execute([job], InProcess(store), store, tracking)
    tracking.tracker(job).finish({"computed": out.computed, "reused": out.reused})
    client = mlflow_client()
    parent = tracking.tracker(job).parent
    runs = client.search_runs([tracking.tracker(job).experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_name for r in runs) == ["k=0 dense", "k=3 dense"]
    for r in runs:
        row = next(x for x in job.plan.rounds if x.name == r.info.run_name)
        info = out.refs[row.analysis.key].info
        assert r.data.metrics["instability/test"] == pytest.approx(info.instability["test"])
        assert r.data.tags["pai.analysis_key"] == row.analysis.key
        steps = client.get_metric_history(r.info.run_id, "path/test_err")
        assert [m.value for m in sorted(steps, key=lambda m: m.step)] == pytest.approx(
            [p["test_err"] for p in info.path])
    report = write_report([spec], store, pai_home / "report")
    assert [p.name for p in report.extra] == ["instability.png", "instability.pdf", "instability.svg"]
    md = report.markdown.read_text()
    assert "## Instability" in md and "| 3 | 1.0000 | 1 |" in md
    assert not math.isnan(out.refs[job.plan.rounds[1].analysis.key].info.relative_distance)
