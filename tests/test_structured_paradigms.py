"""`structure: filter` beyond PaT: structured lottery tickets (LTH) and channel masks at init
(PaI, one-shot and iterative), with the same selection as PaT's."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_spec
from pai_core import structured
from pai_core.masks import dense_mask
from pai_core.models import build_model
from pai_core.paradigms import build_plan, get_paradigm
from pai_core.spec_io import SpecError
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store

LENET5 = {"model": {"name": "lenet5"}, "data": {"dataset": "synthetic", "batch_size": 50}}
FILTERS = {"structure": "filter", "scope": "layerwise"}


def _run(spec, tmp_path):
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    return plan, rt, run_plan(plan.nodes, rt)


def _kept(mask) -> dict[str, int]:
    return {n: int(m.flatten(1).any(1).sum()) for n, m in mask.items()}


def test_a_structured_lottery_ticket_halves_each_layers_filters_every_round(tmp_path):
    spec = tiny_spec("lottery_ticket", **LENET5, prune={"rate": 0.5, "rounds": 2, "physical": True, **FILTERS})
    plan, rt, refs = _run(spec, tmp_path)
    sizes = {"conv1.weight": 20, "conv2.weight": 50, "fc1.weight": 500, "fc2.weight": 10}
    for r, expected in ((1, {"conv1.weight": 10, "conv2.weight": 25, "fc1.weight": 250}),
                        (2, {"conv1.weight": 5, "conv2.weight": 12, "fc1.weight": 125})):
        mask = rt.store.load(refs[plan.rounds[r].mask.key])["mask"]
        assert _kept(mask) == {**sizes, **expected}  # the output layer keeps its 10 neurons
        ev = refs[plan.rounds[r].evaluate.key].info
        assert ev.physical.test_acc == ev.test_acc  # the smaller net computes the same
    round2 = rt.store.load(refs[plan.rounds[2].mask.key])["mask"]
    round1 = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    assert all(bool((round2[n] <= round1[n]).all()) for n in round1)  # only survivors are re-ranked
    # rewound to the init: the retrained ticket started from exactly the init's kept weights
    assert plan.rounds[2].trained.inputs["start"].key == plan.rounds[0].trained.inputs["start"].key
    assert plan.rounds[1].evaluate.fields.get("physical") is True
    assert get_paradigm("lottery_ticket").label(spec, plan.rounds[1]) == "LTH (filter)"


def test_snip_at_init_keeps_the_filters_with_the_largest_summed_saliency(tmp_path):
    spec = tiny_spec("prune_at_init", **LENET5, prune={"criterion": "snip", "schedule": "one_shot", "sparsity": 0.5,
                                                       "rate": None, "rounds": 1, **FILTERS})
    plan, rt, refs = _run(spec, tmp_path)
    mask_node = plan.rounds[1].mask
    scores = rt.store.load(refs[mask_node.inputs["scores"].key])["scores"]
    model = build_model("lenet5", (1, 16, 16), 10, seed=0)
    expected = structured.select_filters(model, scores, dense_mask(model), 0.5, "l1")
    mask = rt.store.load(refs[mask_node.key])["mask"]
    assert all(torch.equal(mask[n], expected[n]) for n in expected)
    conv1 = scores["conv1.weight"].abs().flatten(1).sum(1)
    assert torch.equal(mask["conv1.weight"].flatten(1).any(1), conv1 >= conv1.sort(descending=True).values[9])
    weights = rt.store.load(refs[plan.rounds[1].trained.key])["model"]
    assert int(weights["conv1.weight"][~mask["conv1.weight"]].ne(0).sum()) == 0  # trained from init, masked


def test_iterative_channel_pruning_at_init_reaches_each_layers_count(tmp_path):
    spec = tiny_spec("prune_at_init", **LENET5, prune={"criterion": "synflow", "sparsity": 0.75, "rate": None,
                                                       "rounds": 4, **FILTERS})
    assert spec.prune.schedule == "iterative"
    plan, rt, refs = _run(spec, tmp_path)
    mask = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    d = spec.prune.round_densities()[-1]  # 0.25 up to float error: 50 · d rounds to 13
    assert _kept(mask) == {"conv1.weight": round(20 * d), "conv2.weight": round(50 * d),
                           "fc1.weight": round(500 * d), "fc2.weight": 10}
    info = refs[plan.rounds[1].mask.key].info
    assert len(info.per_round) == 4 and info.structured["pruned"]["parameters"] < info.structured["dense"]["parameters"]


def test_sanity_checks_invert_a_structured_tickets_filters(tmp_path):
    spec = tiny_spec("sanity_checks", **LENET5, prune={"rate": 0.5, "rounds": 1, **FILTERS},
                     sanity={"base": "lottery_ticket", "checks": ["invert"]})
    plan, rt, refs = _run(spec, tmp_path)
    original = rt.store.load(refs[plan.rounds[0].mask.key])["mask"]
    inverted = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    for n in ("conv1.weight", "conv2.weight", "fc1.weight"):
        kept, inv = original[n].flatten(1).any(1), inverted[n].flatten(1).any(1)
        assert int(kept.sum()) == int(inv.sum()) and not bool((kept & inv).any())


def test_filter_options_are_refused_without_filter_structure_in_every_paradigm():
    with pytest.raises(SpecError, match=r"^prune.filter_norm: only structure filter uses it"):
        tiny_spec("lottery_ticket", prune={"filter_norm": "l2"})
    with pytest.raises(SpecError, match=r"^prune.physical: the smaller net exists only for structure filter; "
                                        r"allowed: false$"):
        tiny_spec("prune_at_init", prune={"criterion": "snip", "schedule": "one_shot", "sparsity": 0.5, "rate": None,
                                          "rounds": 1, "physical": True})
    with pytest.raises(SpecError, match=r"^prune.scope: structure filter ranks the filters"):
        tiny_spec("lottery_ticket", **LENET5, prune={"structure": "filter", "scope": "erk"})
