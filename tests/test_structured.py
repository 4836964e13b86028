"""Structured pruning: whole filters and their dependent channels go, and the physically
smaller net computes what the masked one does."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_spec
from pai_core.data import load
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.spec_io import SpecError
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.structured import chain, cost, filter_mask, physically_prune


@pytest.mark.parametrize("name, shape", [("vgg11", (3, 32, 32)), ("lenet5", (1, 28, 28)), ("conv4", (3, 32, 32))])
def test_physically_pruned_net_equals_the_masked_one(name, shape):
    model = build_model(name, shape, 10, seed=0).eval()
    for m in model.modules():  # non-trivial norm statistics, so a leaking channel would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    g = torch.Generator().manual_seed(0)
    keep = {n: torch.rand(layer.weight.shape[0], generator=g) > 0.5 for n, layer in chain(model)[:-1]}
    mask = filter_mask(model, keep)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in masked.named_parameters():
            if n in mask:
                p.mul_(mask[n])
    small = physically_prune(model, mask).eval()
    x = torch.randn(8, *shape, generator=g)
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
    for n, layer in chain(small)[:-1]:
        assert layer.weight.shape[0] == int(keep[n].sum())
    assert cost(small, shape)["weights"] == cost(model, shape, mask)["weights"] < cost(model, shape)["weights"]
    assert cost(small, shape)["flops"] == cost(model, shape, mask)["flops"]


def test_structured_pat_removes_whole_filters(tmp_path):
    spec = tiny_spec("prune_after_training", model={"name": "conv2"},
                     prune={"schedule": "one_shot", "sparsity": 0.5, "rate": None, "rounds": 1, "scope": "layerwise",
                            "structure": "filter", "filter_norm": "l2", "physical": True})
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    mask = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    for name in ("features.conv1.weight", "features.conv2.weight", "fc1.weight", "fc2.weight"):
        rows = mask[name].flatten(1)
        assert rows.any(1).sum() == rows.shape[0] // 2, "half of the filters"
    # A kept filter of conv2 reads exactly the kept filters of conv1, all 3×3 of each.
    kept_in = mask["features.conv1.weight"].flatten(1).any(1)
    conv2 = mask["features.conv2.weight"]
    for row in conv2[conv2.flatten(1).any(1)]:
        assert torch.equal(row, kept_in[:, None, None].expand_as(row))
    info = refs[plan.rounds[1].mask.key].info.structured
    assert info["pruned"]["flops"] < info["dense"]["flops"] / 2
    trained = rt.store.load(refs[plan.rounds[1].trained.key])["model"]
    model = build_model("conv2", (1, 16, 16), 10, seed=0)
    model.load_state_dict(trained)
    data = load("synthetic")
    small = physically_prune(model, mask)
    torch.testing.assert_close(small(data.test.x), model(data.test.x), rtol=1e-4, atol=1e-5)
    # The evaluate stage built the same smaller net, and it scores what the masked one does.
    ev = refs[plan.rounds[1].evaluate.key]
    assert abs(ev.info.physical.test_acc - ev.info.test_acc) <= 1 / 300  # at most a near-tie flips
    assert ev.info.physical.cost["parameters"] == sum(p.numel() for p in small.parameters())
    stored = rt.store.load(ev)["model"]
    assert all(torch.equal(stored[k], v) for k, v in small.state_dict().items())


def test_structured_needs_channel_groups_and_layerwise_scope(monkeypatch):
    from pai_core.models import registry

    grouped = lambda in_shape, num_classes: torch.nn.Sequential(  # noqa: E731
        torch.nn.Conv2d(in_shape[0], 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1, groups=2),
        torch.nn.Flatten(), torch.nn.Linear(4 * in_shape[1] * in_shape[2], num_classes))
    monkeypatch.setitem(registry._MODELS, "grouped_test", registry.ModelInfo("grouped_test", grouped, "test"))
    with pytest.raises(SpecError, match=r"prune.structure: filter needs the channel groups of grouped_test: .*"
                                        r"grouped convolution \(groups=2\); supported: groups=1 or depthwise \(groups = in = out "
                                        r"channels\); allowed: unstructured, nm"):
        tiny_spec("prune_after_training", model={"name": "grouped_test"},
                  prune={"schedule": "one_shot", "sparsity": 0.5, "rate": None, "rounds": 1, "scope": "layerwise",
                         "structure": "filter"})
    tiny_spec("prune_after_training", model={"name": "resnet20"},  # a residual net has channel groups
              prune={"schedule": "one_shot", "sparsity": 0.5, "rate": None, "rounds": 1, "scope": "layerwise",
                     "structure": "filter"})


def test_inverted_filter_selection_keeps_the_lowest_ranked_filters():
    """The sanity checks' inverted filter mask: negating the weights' scores changes nothing under
    a norm, so the filter scores themselves are negated."""
    from pai_core import structured
    from pai_core.masks import dense_mask
    from pai_core.models import build_model

    model = build_model("lenet5", (1, 28, 28), 10, seed=0)
    gen = torch.Generator().manual_seed(0)
    previous = dense_mask(model)
    scores = {n: torch.rand(m.shape, generator=gen) for n, m in previous.items()}
    kept = structured.kept_filters(model, structured.select_filters(model, scores, previous, 0.5, "l1"))
    inverted = structured.kept_filters(model, structured.select_filters(model, scores, previous, 0.5, "l1",
                                                                        invert=True))
    for name, k in kept.items():
        assert int(k.sum()) == int(inverted[name].sum()) and not (k & inverted[name]).any()


def test_unshared_channels_may_pass_through_a_depthwise_conv_but_not_a_residual_add():
    """MobileNetV2's expanded channels are written by the 1x1 expansion and again by the depthwise
    conv (filter c is channel c): one writer for `unshared`. Its residual streams stay out (at
    width 0.25 block 1 is residual too, so the stem's channels are a stream)."""
    from pai_core import channel_graph, structured

    model = build_model("mobilenet_v2", (3, 32, 32), 10, seed=0, width=0.25)
    graph = channel_graph.trace(model)
    unshared = structured.unit_families(model, "unshared", graph)
    every = structured.unit_families(model, "all", graph)
    through_dw = {f for f, gs in every.items() if set(gs[0].layers) & graph.depthwise}
    expansions = {f for f in every if f.endswith(".conv.0.0") and f != "features.1.conv.0.0"}  # blocks 2..17
    assert len(expansions) == 16 and expansions <= through_dw & set(unshared)  # every expansion is a candidate
    for f, gs in every.items():
        writers = set(gs[0].layers) - graph.depthwise
        assert (f in unshared) == (len(writers) == 1), f  # residual streams (several writers) are not
    assert any(len(set(gs[0].layers) - graph.depthwise) > 1 for gs in every.values())
    resnet = build_model("resnet20", (3, 32, 32), 10, seed=0, shortcut="A")
    assert all(len(gs[0].layers) == 1 for gs in structured.unit_families(resnet, "unshared").values())
