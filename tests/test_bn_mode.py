"""BatchNorm while scoring: the criterion's paper mode by default, a spec option, and the
model's running statistics exactly as they were afterwards."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_raw
from pai_core.paradigms import build_plan
from pai_core.spec_io import SpecError, parse_spec
from pai_core.stages import Runtime, run_plan
from pai_core.stages.common import model_from
from pai_core.stages.score import score, scoring_mode
from pai_core.store import Store

BN_MODEL = {"name": "conv2", "width": 0.125, "batch_norm": True}


def at_init(criterion, model=None, **prune):
    raw = tiny_raw("prune_at_init", **({"model": model} if model else {}))
    raw["prune"] = {"criterion": criterion, "schedule": "one_shot", "sparsity": 0.5, **prune}
    return parse_spec(raw)


def score_node(spec):
    return build_plan(spec).rounds[1].mask.inputs["scores"]


def test_bn_mode_is_keyed_only_where_there_is_batch_norm():
    assert "bn_mode" not in score_node(at_init("snip")).fields  # BN-free: the keys it always had
    assert score_node(at_init("snip", BN_MODEL)).fields["bn_mode"] == "eval"   # snip-public
    assert score_node(at_init("grasp", BN_MODEL)).fields["bn_mode"] == "train"  # GraSP's code
    assert score_node(at_init("snip", BN_MODEL, bn_mode="train")).fields["bn_mode"] == "train"
    assert "bn_mode" not in score_node(at_init("magnitude", BN_MODEL)).fields
    with pytest.raises(SpecError, match="prune.bn_mode: criterion magnitude takes no BatchNorm mode .it does not run the network"):
        at_init("magnitude", BN_MODEL, bn_mode="eval")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_scoring_leaves_running_statistics_untouched(tmp_path, mode):
    spec = at_init("snip", BN_MODEL, bn_mode=mode)
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes[:1], rt)  # the init
    init = plan.nodes[0]
    model = model_from(refs[init.key], rt.store.load(refs[init.key]), rt)
    before = {n: b.clone() for n, b in model.named_buffers()}
    node = score_node(spec)
    s = score(model, {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()
                      if n.endswith("weight") and p.dim() > 1}, node, refs[init.key].info.arch,
              torch.Generator().manual_seed(0), rt)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    assert all(torch.isfinite(v).all() for v in s.values())


def test_the_mode_is_what_the_criterion_sees():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model.train()
    seen = []
    with scoring_mode(model, "eval"):
        seen.append(model[1].training)
        model(torch.randn(8, 3))
    with scoring_mode(model, "train"):
        seen.append(model[1].training)
        model(torch.randn(8, 3))  # would move running_mean without the restore
    assert seen == [False, True] and model.training
    assert torch.equal(model[1].running_mean, torch.zeros(4)) and int(model[1].num_batches_tracked) == 0
