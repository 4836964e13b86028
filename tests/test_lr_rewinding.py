"""Learning-rate rewinding: after pruning, the trained weights go on under the mask with the
original schedule replayed from iteration k and a fresh optimizer."""
from __future__ import annotations

import pytest
import torch

from conftest import ROOT, tiny_raw
from pai_core.data import load
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.spec_io import SpecError, load_spec, parse_spec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.training import train


@pytest.mark.parametrize("k", [0, 15])
def test_replays_the_schedule_from_k_on_the_trained_weights(tmp_path, k):
    raw = tiny_raw("lr_rewinding")
    raw["prune"] = {"rate": 0.5, "rounds": 2, "lr_rewind_iter": k}
    spec = parse_spec(raw)
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    for prev, rnd in zip(plan.rounds, plan.rounds[1:]):
        assert rnd.trained.inputs["start"] is prev.trained, "keeps the previous round's trained weights"
        data = load("synthetic")
        model = build_model("lenet_300_100", data.in_shape, 10, seed=0)
        model.load_state_dict(rt.store.load(refs[prev.trained.key])["model"])
        mask = rt.store.load(refs[rnd.mask.key])["mask"]
        out = train(model, data, spec.train, batch_size=50, order_seed=spec.order_seed, mask=mask, start_iter=k)
        stored = rt.store.load(refs[rnd.trained.key])["model"]
        assert all(torch.equal(stored[n], v) for n, v in model.state_dict().items())
        assert out.history[0]["iteration"] == 20 and len(out.history) == (40 - k + 19) // 20
        assert refs[rnd.trained.key].info.iteration == 40


def test_round_one_mask_is_the_lottery_tickets():
    lth = build_plan(load_spec(ROOT / "configs/lth/lenet300_mnist.yaml"))
    lrr = build_plan(load_spec(ROOT / "configs/lr_rewinding/lenet300_mnist.yaml"))
    assert lth.rounds[0].trained.key == lrr.rounds[0].trained.key
    assert lth.rounds[1].mask.key == lrr.rounds[1].mask.key
    assert lth.rounds[1].trained.key != lrr.rounds[1].trained.key


def test_rewind_point_must_lie_inside_the_schedule():
    raw = tiny_raw("lr_rewinding")
    raw["prune"] = {"rate": 0.5, "rounds": 1, "lr_rewind_iter": 40}
    with pytest.raises(SpecError, match="prune.lr_rewind_iter: must be < the 40"):
        parse_spec(raw)
