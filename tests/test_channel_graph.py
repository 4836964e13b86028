"""Channel groups of residual nets: which filters go together, and the physically smaller
ResNet computing what the masked one does."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from conftest import tiny_spec
from pai_core import channel_graph, structured
from pai_core.export import masked_copy
from pai_core.masks import dense_mask
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store


def _blocks(stage: int, n: int, layer: str) -> list[str]:
    return [f"layer{stage}.{i}.{layer}" for i in range(n)]


def test_option_b_resnet_groups_its_residual_streams_by_stage():
    g = channel_graph.trace(build_model("resnet20", (3, 32, 32), 10, seed=0))
    streams = {"conv1": ["conv1", *_blocks(1, 3, "conv2")],
               "layer2.0.conv2": ["layer2.0.conv2", "layer2.0.shortcut.0", *_blocks(2, 3, "conv2")[1:]],
               "layer3.0.conv2": ["layer3.0.conv2", "layer3.0.shortcut.0", *_blocks(3, 3, "conv2")[1:]]}
    inner = [f"layer{s}.{i}.conv1" for s in (1, 2, 3) for i in range(3)]
    assert sorted(g.families) == sorted([*streams, *inner])
    for fam, layers in streams.items():
        groups = g.families[fam]
        assert len(groups) == {"conv1": 16, "layer2.0.conv2": 32, "layer3.0.conv2": 64}[fam]
        for c, group in enumerate(groups):  # channel c of every conv writing the stream, nothing else
            assert sorted(group.producers) == sorted((layer, c) for layer in layers)
    stem = g.families["conv1"][5]
    readers = {"layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"}
    assert sorted(stem.consumers) == sorted((r, 5) for r in readers)
    assert sorted(stem.norms) == sorted((n, 5) for n in ["bn1", *_blocks(1, 3, "bn2")])
    assert [p for p in g.families["layer2.1.conv1"][3].producers] == [("layer2.1.conv1", 3)]
    assert "fc" not in g.families  # the output is pinned


def test_option_a_ties_a_channel_across_every_stage_it_is_padded_into():
    g = channel_graph.trace(build_model("resnet20", (3, 32, 32), 10, seed=0, shortcut="A"))
    ones = [f for f, gs in g.families.items() if len(gs[0].layers) > 1]
    assert ones == ["conv1", "layer2.0.conv2", "layer3.0.conv2"]
    assert [len(g.families[f]) for f in ones] == [16, 16, 32]  # stage 3's 64 = 16 + 16 + 32
    assert len(g.families["conv1"][0].layers) == 1 + 3 + 3 + 3  # stem and all nine blocks' conv2
    assert ("layer3.2.conv2", 0) in g.families["conv1"][0].producers
    # stage 2's channel 16 + k is zero channel k of stage 2's pad (fx names it "pad"); stage 3's
    # pad appends channels 32..63 only, so channel 20 reaches stage 3 through its input
    late = g.families["layer2.0.conv2"][4]
    assert ("layer2.0.conv2", 20) in late.producers and ("layer3.0.conv2", 20) in late.producers
    assert late.pads == (("pad", 4),)
    assert g.families["layer3.0.conv2"][0].pads == (("pad_1", 0),)


def test_a_chain_net_has_one_group_per_filter_of_every_layer_but_the_output():
    model = build_model("lenet5", (1, 28, 28), 10, seed=0)
    g = channel_graph.trace(model)
    layers = structured.chain(model)
    assert list(g.families) == [n for n, _ in layers[:-1]]
    for name, layer in layers[:-1]:
        assert [grp.producers for grp in g.families[name]] == [((name, c),) for c in range(layer.weight.shape[0])]


def _randomise_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics and shifts: a channel that leaks past its removal would show."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)


@pytest.mark.parametrize("name, params, shape", [
    ("resnet20", {"shortcut": "A"}, (3, 16, 16)), ("resnet20", {"shortcut": "B"}, (3, 16, 16)),
    ("wrn", {"depth": 10, "widen": 2}, (3, 16, 16)), ("resnet18", {}, (3, 32, 32)),
])
@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_physically_pruned_residual_net_equals_the_masked_one(name, params, shape, scope):
    gen = torch.Generator().manual_seed(1)
    model = build_model(name, shape, 10, seed=0, **params).eval()
    _randomise_norms(model, gen)
    scores = {n: torch.rand(m.shape, generator=gen) for n, m in dense_mask(model).items()}
    mask = structured.select_filters(model, scores, dense_mask(model), 0.5, "l1", min_density=0.1, scope=scope)
    masked = masked_copy(model, mask)  # the reference every export is checked against
    small = structured.physically_prune(model, mask).eval()
    x = torch.randn(4, *shape, generator=gen)
    torch.testing.assert_close(small(x), masked(x), rtol=1e-4, atol=1e-4)
    kept = structured.kept_filters(model, mask)
    if scope == "layerwise":
        for fam, k in kept.items():
            assert int(k.sum()) == round(len(k) * 0.5), fam
    width: dict[str, int] = {}  # a layer keeps one filter per kept group it writes
    for fam, groups in channel_graph.trace(model).families.items():
        for group, k in zip(groups, kept[fam].tolist()):
            for layer, _ in group.producers:
                width[layer] = width.get(layer, 0) + int(k)
    assert {n: small.get_submodule(n).weight.shape[0] for n in width} == width
    assert sum(width.values()) < sum(model.get_submodule(n).weight.shape[0] for n in width)
    assert structured.cost(small, shape)["weights"] == structured.cost(model, shape, mask)["weights"]
    assert isinstance(small, fx.GraphModule) == (params.get("shortcut") == "A")  # pads rewritten
    rebuilt = structured.physically_prune(build_model(name, shape, 10, seed=5, **params), mask)
    rebuilt.load_state_dict(small.state_dict())  # the smaller net rebuilds from arch + mask


def test_group_scores_combine_every_producer_of_the_group():
    model = build_model("resnet20", (3, 8, 8), 10, seed=0, width=0.25)
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.randn(m.shape, generator=gen) for n, m in dense_mask(model).items()}
    stream = ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    for norm in ("l1", "l2", "max"):
        got = structured.filter_scores(model, scores, norm)["conv1"]
        for c in range(4):
            w = torch.cat([scores[f"{n}.weight"][c].abs().flatten() for n in stream])
            want = w.sum() if norm == "l1" else w.pow(2).sum().sqrt() if norm == "l2" else w.max()
            torch.testing.assert_close(got[c], want)


def test_unshared_families_leave_the_residual_stream_whole():
    model = build_model("resnet20", (3, 8, 8), 10, seed=0, width=0.5)
    units = structured.unit_layers(model, "unshared")
    assert [f for f, _ in units] == [f"layer{s}.{i}.conv1" for s in (1, 2, 3) for i in range(3)]
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(m.shape, generator=gen) for n, m in dense_mask(model).items()}
    mask = structured.select_filters(model, scores, dense_mask(model), 0.5, "l1", layers="unshared")
    assert mask["layer1.0.conv2.weight"].flatten(1).any(1).all()  # the stream keeps every channel
    assert int(mask["layer1.0.conv1.weight"].flatten(1).any(1).sum()) == 4  # half of 8


class _Unknown(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.conv, self.op, self.fc = nn.Conv2d(3, 4, 3), op, nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.op == "index":
            y = y[:, :2]
        elif self.op == "matmul":
            y = torch.matmul(y, y)
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("op, message", [
    ("index", r"indexing .*; supported: slicing the dims after the channels"),
    ("matmul", r"node 'matmul' \(call_function matmul\): channel mapping unknown"),
])
def test_ops_with_unknown_channel_mappings_are_refused_by_name(op, message):
    with pytest.raises(channel_graph.ChannelGraphError, match=message):
        channel_graph.trace(_Unknown(op))


def test_structured_pat_prunes_a_resnet_and_its_smaller_net_scores_the_same(tmp_path):
    spec = tiny_spec("prune_after_training", model={"name": "resnet20", "width": 0.25, "shortcut": "A"},
                     data={"dataset": "synthetic_cifar", "batch_size": 50},
                     train={"epochs": 1}, retrain={"epochs": 1},
                     prune={"schedule": "one_shot", "sparsity": 0.5, "rate": None, "rounds": 1, "scope": "layerwise",
                            "structure": "filter", "physical": True})
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    mask = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    stream = mask["conv1.weight"].flatten(1).any(1)
    assert int(stream.sum()) == 2  # half of the stem's 4 channels
    for layer in ("layer1.2.conv2", "layer3.1.conv2"):  # the same channels of the stream everywhere
        assert torch.equal(mask[f"{layer}.weight"].flatten(1).any(1)[:4], stream)
    ev = refs[plan.rounds[1].evaluate.key]
    assert abs(ev.info.physical.test_acc - ev.info.test_acc) <= 1 / 100
    assert ev.info.physical.cost["weights"] < ev.info.physical.cost["parameters"]


def test_a_pruned_option_a_resnet_exports_and_loads_as_torch_export(tmp_path):
    """The GraphModule with rewritten pads is an ordinary torch.export program: saved, loaded
    back, and computing what the masked net computes."""
    from pai_core.export import build, load_exported, save_module

    gen = torch.Generator().manual_seed(2)
    model = build_model("resnet20", (3, 16, 16), 10, seed=0, width=0.5, shortcut="A").eval()
    _randomise_norms(model, gen)
    scores = {n: torch.rand(m.shape, generator=gen) for n, m in dense_mask(model).items()}
    mask = structured.select_filters(model, scores, dense_mask(model), 0.5, "l2")
    x = torch.randn(5, 3, 16, 16, generator=gen)
    module = build("structured", model, mask, x)  # refused past the tolerance
    path = save_module(module, "structured", tmp_path / "model.pt2", x)
    loaded = load_exported(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), masked_copy(model, mask)(x), rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in module.parameters()) < sum(p.numel() for p in model.parameters()) / 2


class _Mixed(nn.Module):
    """Every other op channel_graph maps: concatenation (DenseNet's), a product of two feature
    maps, functional relu, spatial slicing, a spatial mean, and view(n, -1) before a Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(9)
        self.c, self.d = nn.Conv2d(9, 6, 1), nn.Conv2d(9, 6, 1)
        self.e = nn.Conv2d(6, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(4 * 4 * 4, 5), nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(torch.cat([self.a(x), self.b(x)], dim=1))  # DenseNet-style: channels side by side
        z = torch.nn.functional.relu(self.c(y)) * torch.sigmoid(self.d(y))  # gated: c and d tied
        w = self.e(z)[:, :, ::2, ::2]
        return self.fc1(w.contiguous().view(w.size(0), -1)) + self.fc2(z.mean((2, 3)))


def test_concatenation_products_and_flattening_views_prune_exactly():
    gen = torch.Generator().manual_seed(3)
    model = _Mixed().eval()
    _randomise_norms(model, gen)
    g = channel_graph.trace(model)
    assert [len(g.families[f]) for f in ("a", "b", "c", "e")] == [4, 5, 6, 4]
    assert set(g.families) == {"a", "b", "c", "e"}  # d is in c's family: the product ties them
    assert all(len(grp.layers) == 2 for grp in g.families["c"])
    bn_entries = sorted(i for grp in g.families["b"] for _, i in grp.norms)
    assert bn_entries == [4, 5, 6, 7, 8]  # b's channels sit after a's in the concatenation
    scores = {n: torch.rand(m.shape, generator=gen) for n, m in dense_mask(model).items()}
    mask = structured.select_filters(model, scores, dense_mask(model), 0.5, "l1")
    small = structured.physically_prune(model, mask).eval()
    masked = masked_copy(model, mask)  # the reference every export is checked against
    x = torch.randn(3, 3, 8, 8, generator=gen)
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
    assert small.bn.num_features == 2 + 2 and small.fc1.in_features == 2 * 16  # round(4/2)+round(5/2), e: 2 of 4


class _SpatialPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.pad(self.a(x), (1, 1, 2, 0))  # width and height only
        return self.fc(self.b(y).mean((2, 3)))


def test_spatial_padding_leaves_channels_alone():
    model = _SpatialPad().eval()
    g = channel_graph.trace(model)
    assert g.pad_roots == {} and [len(v) for v in g.families.values()] == [6, 4]
    scores = {n: torch.rand(m.shape) for n, m in dense_mask(model).items()}
    mask = structured.select_filters(model, scores, dense_mask(model), 0.5, "l1")
    small = structured.physically_prune(model, mask)
    assert not isinstance(small, fx.GraphModule)  # no channel pad to rewrite: the spatial one stays
    x = torch.randn(2, 3, 9, 9)
    masked = masked_copy(model, mask)  # the reference every export is checked against
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)


def test_mobilenet_v2_is_torchvisions_and_prunes_its_depthwise_filters_with_their_channels():
    from torchvision.models import mobilenet_v2

    assert sum(p.numel() for p in build_model("mobilenet_v2", (3, 224, 224), 1000, seed=0).parameters()) == 3_504_872
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        reference = mobilenet_v2(weights=None, num_classes=10, width_mult=0.5).state_dict()
    ours = build_model("mobilenet_v2", (3, 32, 32), 10, seed=4, width=0.5).state_dict()
    assert all(torch.equal(ours[k], v) for k, v in reference.items()) and ours.keys() == reference.keys()

    gen = torch.Generator().manual_seed(5)
    model = build_model("mobilenet_v2", (3, 32, 32), 10, seed=0, width=0.5).eval()
    _randomise_norms(model, gen)
    g = channel_graph.trace(model)
    assert "features.2.conv.1.0" in g.depthwise  # block 2: expand, depthwise, project
    family = g.families["features.2.conv.0.0"]
    assert all(grp.layers == ("features.2.conv.0.0", "features.2.conv.1.0") for grp in family)
    assert [(grp.producers[0][1], grp.producers[1][1]) for grp in family[:3]] == [(0, 0), (1, 1), (2, 2)]
    scores = {n: torch.rand(m.shape, generator=gen) for n, m in dense_mask(model).items()}
    mask = structured.select_filters(model, scores, dense_mask(model), 0.5, "l1")
    small = structured.physically_prune(model, mask).eval()
    dw = small.get_submodule("features.2.conv.1.0")
    assert dw.groups == dw.in_channels == dw.out_channels == small.get_submodule("features.2.conv.0.0").out_channels
    masked = masked_copy(model, mask)  # the reference every export is checked against
    x = torch.randn(2, 3, 32, 32, generator=gen)
    torch.testing.assert_close(small(x), masked(x), rtol=1e-4, atol=1e-5)
    assert structured.cost(small, (3, 32, 32))["flops"] == structured.cost(model, (3, 32, 32), mask)["flops"]
