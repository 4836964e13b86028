"""LAMP (Lee et al., ICLR 2021): the score against a hand computation and against its definition
written as a loop, the allocation it gives, and the masks an IMP run takes with it."""
from __future__ import annotations

import torch
from torch import nn

from conftest import tiny_spec
from pai_core.criteria import ScoreInputs, get_criterion
from pai_core.criteria.lamp import lamp_scores
from pai_core.masks import dense_mask
from pai_core.paradigms import build_plan
from pai_core.selection import select
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store


def test_a_hand_computed_layer():
    # squares 9, 1, 4, 0 ascending: 0, 1, 4, 9; sums from each one up: 14, 14, 13, 9
    got = lamp_scores(torch.tensor([[3.0, -1.0], [2.0, 0.0]]))
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.tensor([[1.0, 1 / 14], [4 / 13, 0.0]], dtype=torch.float64), rtol=0, atol=1e-15)


def test_the_definition_as_a_loop_with_ties_ordered_by_position():
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    w[0, :3] = 0.5  # three equal magnitudes: the earlier one sorts first, so it scores lower
    w[1, 0] = -0.5
    flat = w.flatten().double()
    order = sorted(range(flat.numel()), key=lambda i: (flat[i].item() ** 2, i))
    want = torch.empty_like(flat)
    for rank, i in enumerate(order):
        want[i] = flat[i] ** 2 / sum(flat[j] ** 2 for j in order[rank:])
    assert torch.allclose(lamp_scores(w).flatten(), want, rtol=1e-12, atol=0)
    tied = lamp_scores(w)
    assert tied[0, 0] < tied[0, 1] < tied[0, 2] < tied[1, 0]


def test_each_layer_keeps_its_largest_weights_and_is_never_emptied():
    """Two layers, one with weights 100x smaller: global magnitude empties it at 5 %, LAMP keeps
    its largest weights and the layer's order is magnitude's."""
    gen = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 10))
    with torch.no_grad():
        net[1].weight.copy_(torch.randn(10, 30, generator=gen) / 100)
    mask = dense_mask(net)
    crit = get_criterion("lamp")
    scores = crit.score(net, mask, ScoreInputs(gen, (20,), 10), crit.Params())
    magnitude = {n: p.detach().abs() for n, p in net.named_parameters() if n in mask}
    assert int(select(magnitude, mask, 0.05)["1.weight"].sum()) == 0
    kept = select(scores, mask, 0.05)
    for name, m in kept.items():
        k = int(m.sum())
        assert k >= 1
        w = magnitude[name].flatten()
        assert set(m.flatten().nonzero().squeeze(1).tolist()) == set(w.topk(k).indices.tolist())
    assert sum(int(m.sum()) for m in kept.values()) == round(900 * 0.05)


def test_pruned_weights_do_not_count_in_the_survivors_scores():
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    alive = torch.rand(6, 8, generator=torch.Generator().manual_seed(3)) > 0.5
    masked = lamp_scores(w * alive)
    alone = lamp_scores(w[alive])
    assert torch.equal(masked[alive], alone) and torch.count_nonzero(masked[~alive]) == 0


def test_imp_with_lamp_prunes_each_round_by_the_lamp_scores_of_the_trained_ticket(tmp_path):
    spec = tiny_spec(prune={"criterion": "lamp", "scope": "global", "rate": 0.6, "rounds": 2})
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    for r in (1, 2):
        trained = rt.store.load(refs[plan.rounds[r - 1].trained.key])
        before = trained.get("mask") or {n: torch.ones_like(trained["model"][n], dtype=torch.bool)
                                         for n in rt.store.load(refs[plan.rounds[r].mask.key])["mask"]}
        want = select({n: lamp_scores(trained["model"][n] * before[n]) for n in before}, before, 0.4 ** r)
        got = rt.store.load(refs[plan.rounds[r].mask.key])["mask"]
        assert all(torch.equal(got[n], want[n]) for n in want)
        total = sum(m.numel() for m in got.values())
        assert sum(int(m.sum()) for m in got.values()) == round(total * 0.4 ** r)
        assert all(int(m.sum()) >= 1 for m in got.values())
