"""PHEW (Patil & Dovrolis 2021): walks worked out by hand on a net whose walks are forced, the
draw ∝ |w| measured, the weight-to-unit maps of convs and a flatten checked
against loops, kept weights forming walks (connected paths, one partial walk at most), exact
counts, nested masks across densities, and every refusal named before any compute."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, tiny_raw
from pai_core.criteria import ScoreInputs, get_criterion
from pai_core.criteria.phew import PhewError, _Sampler, _Walker, unit_graph, walk_order
from pai_core.collapse import collapse_report
from pai_core.masks import dense_mask
from pai_core.models import model_info
from pai_core.paradigms import build_plan
from pai_core.selection import select
from pai_core.spec_io import SpecError, load_spec, parse_spec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store


class MLP(nn.Module):
    def __init__(self, *widths: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
        return x


class ConvNet(nn.Module):
    """conv → pool → conv → flatten → linear: every unit map the walks use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


def phew_scores(model: nn.Module, density: float, seed: int = 0, mask=None):
    mask = mask if mask is not None else dense_mask(model)
    inputs = ScoreInputs(torch.Generator().manual_seed(seed), (1, 1), 2)
    inputs.keep = round(sum(m.numel() for m in mask.values()) * density)
    return get_criterion("phew").score(model, mask, inputs, None), mask


def forced_net() -> MLP:
    """2 → 2 → 2 with one nonzero weight out of and into every unit: every walk is forced."""
    net = MLP(2, 2, 2)
    with torch.no_grad():
        net.layers[0].weight.copy_(torch.tensor([[0.0, -0.5], [2.0, 0.0]]))  # in0 → h1, in1 → h0
        net.layers[1].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, -1.0]]))  # h0 → o0, h1 → o1
    return net


def test_forced_walks_give_the_hand_worked_order_and_scores():
    # forward 0 from in0: w1[1,0], w2[1,1]; backward 0 from o0: w2[0,0], w1[0,1]; then nothing new
    scores, _ = phew_scores(forced_net(), 4 / 8)
    assert torch.equal(scores["layers.0.weight"], torch.tensor([[0.0, 1.0], [4.0, 0.0]], dtype=torch.float64))
    assert torch.equal(scores["layers.1.weight"], torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64))
    # three kept: the mask stops inside backward walk 0, after its first weight
    scores, mask = phew_scores(forced_net(), 3 / 8)
    kept = select(scores, mask, 3 / 8, "global")
    assert kept["layers.0.weight"].tolist() == [[False, False], [True, False]]
    assert kept["layers.1.weight"].tolist() == [[True, False], [False, True]]


def test_walks_that_cannot_reach_the_count_are_refused_naming_it():
    with pytest.raises(PhewError, match=r"reached 4 of the 5 weights to keep"):
        phew_scores(forced_net(), 5 / 8)


def test_a_draw_is_proportional_to_the_weight_and_never_a_zero():
    unit = torch.tensor([1, 0, 1, 1, 0, 1, 1])  # unit 0: edges 1, 4; unit 1: edges 0, 2, 3, 5, 6
    weight = torch.tensor([1.0, 5.0, 2.0, 0.0, 5.0, 3.0, 4.0], dtype=torch.float64)
    sampler = _Sampler(unit, weight, 3)  # unit 2 has no edge
    g = torch.Generator().manual_seed(0)
    n = 200_000
    drawn = sampler.draw(torch.ones(n, dtype=torch.int64), torch.rand(n, generator=g, dtype=torch.float64))
    freq = torch.bincount(drawn, minlength=7).double() / n
    expected = torch.tensor([1, 0, 2, 0, 0, 3, 4], dtype=torch.float64) / 10
    assert freq[3] == 0 and freq[1] == 0 and freq[4] == 0
    assert (freq - expected).abs().max() < 0.005  # 200k draws: the standard error is ~0.001
    assert sampler.draw(torch.tensor([0, 2]), torch.tensor([0.999999, 0.5], dtype=torch.float64)).tolist() == [4, -1]
    edge = sampler.draw(torch.tensor([1]), torch.tensor([1.0], dtype=torch.float64))  # rounds past the end
    assert edge.tolist() == [6]


class Residual(nn.Module):
    """conv0 → [conv1 → conv2] + shortcut → flatten → fc: the block can be skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.conv1, self.conv2 = (nn.Conv2d(i, 2, 3, padding=1) for i in (1, 2, 2))
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.conv0(x))
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x))) + x).flatten(1))


def links(g) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for s, u in zip(g.link_slot.tolist(), g.link_unit.tolist()):
        out.setdefault(s, []).append(u)
    return {s: sorted(u) for s, u in out.items()}


def test_unit_maps_of_convs_and_a_flatten_match_loops():
    net = ConvNet()
    g = unit_graph(net)
    # units: 2 input channels, conv1 2-5, conv2 6-11, fc 12-16; slots: conv1 0-1, conv2 2-5, fc 6-11
    assert g.layers == ["conv1.weight", "conv2.weight", "fc.weight"] and g.n_units == 17 and g.n_slots == 12
    assert g.inputs.tolist() == [0, 1] and g.outputs.tolist() == [12, 13, 14, 15, 16]
    assert links(g) == {**{c: [c] for c in range(2)}, **{2 + c: [2 + c] for c in range(4)},
                        **{6 + c: [6 + c] for c in range(6)}}
    expect_slot, expect_out = [], []
    for base_slot, base_unit, layer in ((0, 2, "conv1"), (2, 6, "conv2"), (6, 12, "fc")):
        w = net.get_submodule(layer).weight
        for flat in range(w.numel()):
            o, rest = divmod(flat, w[0].numel())
            col = rest // w[0, 0].numel()
            expect_slot.append(base_slot + (col // 4 if layer == "fc" else col))  # fc: 6 channels × 2×2, channel-major
            expect_out.append(base_unit + o)
    assert g.edge_slot.tolist() == expect_slot and g.edge_out.tolist() == expect_out


def test_a_residual_add_feeds_the_next_layer_from_both_of_its_terms():
    g = unit_graph(Residual())
    # units: input 0, conv0 1-2, conv1 3-4, conv2 5-6, fc 7-9; slots: conv0 0, conv1 1-2, conv2 3-4, fc 5-6
    assert links(g) == {0: [0], 1: [1], 2: [2], 3: [3], 4: [4], 5: [1, 5], 6: [2, 6]}
    assert g.outputs.tolist() == [7, 8, 9]


def test_forward_skips_a_block_by_the_weights_and_backward_picks_a_term_uniformly():
    torch.manual_seed(0)
    net = Residual()
    g = unit_graph(net)
    weight = torch.cat([p.detach().abs().reshape(-1).double() for p in (net.conv0.weight, net.conv1.weight,
                                                                           net.conv2.weight, net.fc.weight)])
    walker, n, gen = _Walker(g, weight), 200_000, torch.Generator().manual_seed(0)
    e, nxt = walker.forward(torch.full((n,), 1), gen)  # from conv0's channel 0
    into_fc = float((nxt >= 7).double().mean())
    fc, conv1 = net.fc.weight.detach()[:, :16].abs().sum(), net.conv1.weight.detach()[:, 0].abs().sum()
    expected = float(fc / (fc + conv1))
    assert abs(into_fc - expected) < 0.005
    e, back = walker.backward(torch.full((n,), 7), gen)  # from fc's output 0
    assert set(back.tolist()) == {1, 2, 5, 6}
    skip = float(((back == 1) | (back == 2)).double().mean())
    assert abs(skip - 0.5) < 0.005  # both terms feed every fc weight: each pair ∝ |w|


@pytest.mark.parametrize("make", [lambda: MLP(12, 10, 8, 3), ConvNet, Residual], ids=["mlp", "convnet", "residual"])
def test_kept_weights_are_walks_and_the_count_is_exact(make):
    torch.manual_seed(0)
    net = make()
    scores, mask = phew_scores(net, 0.1)
    total = sum(m.numel() for m in mask.values())
    g = unit_graph(net)

    def loose(kept):
        """Sides of kept weights with no kept weight (or input/output unit) beyond them."""
        on = torch.cat([kept[n].reshape(-1) for n in g.layers])
        written = set(g.inputs.tolist()) | set(g.edge_out[on].tolist())
        read = set(g.outputs.tolist()) | set(g.link_unit[torch.isin(g.link_slot, g.edge_slot[on])].tolist())
        feeds = links(g)
        return sum(not any(u in written for u in feeds.get(s, [])) for s in g.edge_slot[on].tolist()) + \
            sum(u not in read for u in g.edge_out[on].tolist())

    kept = select(scores, mask, 0.1, "global")
    assert sum(int(k.sum()) for k in kept.values()) == round(0.1 * total)
    assert loose(kept) <= 1  # only the last walk, cut where it reached the count, can leave an end
    rand = select({n: torch.rand(m.shape) for n, m in mask.items()}, mask, 0.1, "global")
    assert loose(rand) > 1  # a random mask of the same count is full of loose ends: the check can fail


def test_masks_are_nested_across_densities_and_depend_on_the_seed():
    torch.manual_seed(0)
    net = MLP(30, 20, 10)
    small, mask = phew_scores(net, 0.05)
    large, _ = phew_scores(net, 0.2)
    a, b = select(small, mask, 0.05, "global"), select(large, mask, 0.2, "global")
    assert all(torch.equal(a[n] & b[n], a[n]) for n in a) and any(not torch.equal(a[n], b[n]) for n in a)
    other, _ = phew_scores(net, 0.05, seed=1)
    assert any(not torch.equal(a[n], select(other, mask, 0.05, "global")[n]) for n in a)


def test_a_second_round_walks_only_the_surviving_weights():
    torch.manual_seed(0)
    net = MLP(30, 20, 10)
    scores, mask = phew_scores(net, 0.5)
    first = select(scores, mask, 0.5, "global")
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n in first:
                p.mul_(first[n])
    second_scores, _ = phew_scores(net, 0.2, mask=first)
    second = select(second_scores, first, 0.2, "global")
    assert all(torch.equal(second[n] & first[n], second[n]) for n in first)
    assert all(((second_scores[n] > 0) <= first[n]).all() for n in first)


def test_an_ignored_layer_is_walked_but_not_counted():
    torch.manual_seed(0)
    net = MLP(12, 10, 8, 3)
    mask = {n: m for n, m in dense_mask(net).items() if n != "layers.2.weight"}  # prune.ignore: the head
    scores, _ = phew_scores(net, 0.1, mask=mask)
    assert set(scores) == set(mask)
    kept = select(scores, mask, 0.1, "global")
    assert sum(int(k.sum()) for k in kept.values()) == round(0.1 * (120 + 80))  # the head's 24 not counted


def test_keeping_everything_needs_no_walk(monkeypatch):
    import pai_core.criteria.phew as mod
    monkeypatch.setattr(mod, "_Walker", lambda *a: pytest.fail("walked"))
    net = forced_net()  # half its weights are 0, on no path: walks could never keep them
    scores, mask = phew_scores(net, 1.0)
    assert all(torch.equal(select(scores, mask, 1.0, "global")[n], mask[n]) for n in mask)


def test_walk_order_is_first_visit_positions():
    order = walk_order(forced_net(), dense_mask(forced_net()), 4, torch.Generator().manual_seed(0))
    # positions are (walk · depth + step): forward 0 at 0, 1; backward 0 (walk 1) at 2, 3
    assert order["layers.0.weight"].tolist() == [[-1, 3], [0, -1]]
    assert order["layers.1.weight"].tolist() == [[2, -1], [-1, 1]]


def at_init(**prune) -> dict:
    return tiny_raw("prune_at_init", prune={"criterion": "phew", "schedule": "one_shot", "sparsity": 0.9,
                                            "rounds": 1, "rate": None, **prune})


@pytest.mark.parametrize("over, message", [
    ({"prune": {"criterion": "phew", "scope": "erk"}}, r"prune\.scope: criterion phew chooses .* allowed: global"),
    ({"prune": {"criterion": "phew", "min_density": 0.01}}, r"prune\.min_density: .* allowed: 0\.0"),
    ({"prune": {"criterion": "phew", "prune_biases": True}}, r"prune\.prune_biases: .* allowed: false"),
    ({"prune": {"criterion": "phew", "structure": "nm", "sparsity": 0.5}}, r"prune\.structure: .* allowed: unstructured"),
    ({"model": {"name": "mobilenet_v2"}, "data": {"dataset": "synthetic_cifar", "val_size": 100}},
     r"prune\.criterion: phew cannot score mobilenet_v2: .*depthwise"),
])
def test_refusals_name_the_field_before_any_compute(over, message, monkeypatch):
    import pai_core.criteria.phew as mod
    monkeypatch.setattr(mod, "walk_order", lambda *a, **k: pytest.fail("computed"))
    raw = at_init()
    for k, v in over.items():
        raw[k] = {**raw[k], **v}
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_residual_nets_validate_and_their_walked_mask_keeps_paths():
    spec = parse_spec(at_init(sparsity=0.97, ignore=["fc.weight"]) | {
        "model": {"name": "resnet20", "shortcut": "A", "width": 0.5},
        "data": {"dataset": "synthetic_cifar", "batch_size": 50, "val_size": 100}})
    torch.manual_seed(0)
    net = model_info("resnet20").construct((3, 32, 32), 10, dict(spec.model.params))
    mask = dense_mask(net, ignore=["fc.weight"])
    scores, _ = phew_scores(net, 0.03, mask=mask)
    kept = select(scores, mask, 0.03, "global")
    assert sum(int(k.sum()) for k in kept.values()) == round(0.03 * sum(m.numel() for m in mask.values()))
    assert not collapse_report(net, kept, (3, 32, 32))["collapsed"]


def test_the_score_stage_is_keyed_by_the_density_and_the_mask_is_exact(tmp_path):
    plans = [build_plan(parse_spec(at_init(sparsity=s))) for s in (0.9, 0.95)]
    scores = [p.rounds[1].mask.inputs["scores"] for p in plans]
    assert scores[0].fields["density"] == pytest.approx(0.1) and scores[0].key != scores[1].key
    snip = build_plan(parse_spec(tiny_raw("prune_at_init", prune={"criterion": "snip", "schedule": "one_shot",
                                                                  "sparsity": 0.9, "rounds": 1, "rate": None})))
    assert "density" not in snip.rounds[1].mask.inputs["scores"].fields
    plan = plans[0]
    node = plan.rounds[1].mask
    rt = Runtime(Store(tmp_path), "cpu")
    mask = rt.store.load(run_plan(plan.nodes[: plan.nodes.index(node) + 1], rt)[node.key])["mask"]
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(total * 0.1)


def test_iterative_rounds_at_init_score_each_round_at_its_own_count(tmp_path):
    plan = build_plan(parse_spec(at_init(schedule="iterative", rounds=3, sparsity=0.9)))
    node = plan.rounds[1].mask
    assert "density" not in node.fields and node.fields["densities"][-1] == pytest.approx(0.1)
    rt = Runtime(Store(tmp_path), "cpu")
    ref = run_plan(plan.nodes[: plan.nodes.index(node) + 1], rt)[node.key]
    total = sum(m.numel() for m in rt.store.load(ref)["mask"].values())
    kept = [round(total * d) for d in node.fields["densities"]]
    assert [round(total * (1 - s)) for s in ref.info.per_round] == kept


def test_the_example_config_shares_the_snip_configs_init_and_dense_round():
    mine = build_plan(load_spec(ROOT / "configs/prune_at_init/phew_lenet300_mnist.yaml", []))
    snip = build_plan(load_spec(ROOT / "configs/prune_at_init/snip_lenet300_mnist.yaml", []))
    assert [n.key for n in mine.nodes_by_round()[0]] == [n.key for n in snip.nodes_by_round()[0]]
    assert mine.rounds[1].mask.inputs["scores"].fields["criterion"] == "phew"
