"""HRank (criterion `hrank`): average feature-map ranks against hand computations on a tiny
net, its averaging over batches, a model left as it was, and a PaT flow whose filter mask
drops exactly the lowest-rank filters of each layer."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import ROOT, tiny_raw
from pai_core.criteria import ScoreInputs, get_criterion
from pai_core.masks import dense_mask
from pai_core.paradigms import build_plan
from pai_core.spec_io import SpecError, load_spec, parse_spec
from pai_core.stages import Runtime, run_plan
from pai_core.stages.common import first_batches, model_from
from pai_core.stages.score import scoring_mode
from pai_core.store import Store

N = 6  # the maps are N×N


class RankNet(nn.Module):
    """5×5 conv (padding 2) -> BatchNorm -> ReLU -> mean -> fc1 -> ReLU -> fc2. Each filter has
    one tap or none, so its map is its input shifted (and signed) and the ranks are known."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 5, 5, padding=2)
        self.bn = nn.BatchNorm2d(5)
        self.fc1 = nn.Linear(5, 3)
        self.fc2 = nn.Linear(3, 2)
        w = torch.zeros(5, 1, 5, 5)
        w[0, 0, 2, 2] = 1.0   # the input itself
        w[1, 0, 2, 2] = -1.0  # its negative
        w[2, 0, 0, 0] = 1.0   # the input shifted two rows down and two columns right (zeros come in)
        with torch.no_grad():  # filters 3 and 4 are zero: their maps are the BN shift β, +1 and -1
            self.conv.weight.copy_(w)
            self.conv.bias.zero_()
            self.bn.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0, -1.0]))
            self.fc1.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]))
            self.fc1.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
            self.fc2.weight.zero_()
            self.fc2.bias.copy_(torch.tensor([1.0, -1.0]))

    def forward(self, x):
        z = torch.relu(self.bn(self.conv(x))).mean((2, 3))  # functional ReLU: no module to hook
        return self.fc2(torch.relu(self.fc1(z)))


def images() -> torch.Tensor:
    """A: a positive rank-1 map u vᵀ; B: ones + I, positive and full rank; C: -B."""
    a = torch.outer(torch.arange(1.0, N + 1), torch.tensor([1.0, 1, 2, 3, 1, 2]))
    b = torch.ones(N, N) + torch.eye(N)
    return torch.stack([a, b, -b])[:, None]


# Per image (A, B, C) and channel, the rank of relu(bn(conv(x))) with BN at its init statistics:
# ch0 relu(x): 1, N, 0 | ch1 relu(-x): 0, 0, N | ch2 x shifted by 2: 1, N - 2, 0 (two zero rows
# and columns) | ch3 the constant 1: 1, 1, 1 | ch4 relu(-1) = 0: 0, 0, 0 (without the ReLU, 1).
PER_IMAGE = torch.tensor([[1, 0, 1, 1, 0], [N, 0, N - 2, 1, 0], [0, N, 0, 1, 0]], dtype=torch.float64)
# fc1 after its ReLU: unit 0 = pooled ch0 > 0 on A and B; unit 1 never fires; unit 2 always. fc2: 1, 0.
FC1 = torch.tensor([[1, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=torch.float64)


def hrank(net: nn.Module, data: list, batches: int, biases: bool = True) -> dict[str, torch.Tensor]:
    crit = get_criterion("hrank")
    return crit.score(net, dense_mask(net, biases), ScoreInputs(torch.Generator(), (1, N, N), 2, iter(data)),
                      crit.Params(batches=batches))


def labels(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


def assert_unit_scores(scores: dict[str, torch.Tensor], layer: str, want: torch.Tensor) -> None:
    """Every weight of unit c, and its bias, carries exactly want[c]."""
    w, b = scores[f"{layer}.weight"], scores[f"{layer}.bias"]
    assert torch.equal(w, want.float().reshape(-1, *[1] * (w.dim() - 1)).expand_as(w)), (layer, w.flatten(1)[:, 0])
    assert torch.equal(b, want.float()), (layer, b)


def test_scores_are_the_average_rank_after_bn_and_relu_by_hand():
    net = RankNet().eval()
    scores = hrank(net, [(images(), labels(3))], batches=1)
    assert_unit_scores(scores, "conv", PER_IMAGE.mean(0))  # 7/3, 2, 5/3, 1, 0
    assert_unit_scores(scores, "fc1", FC1.mean(0))          # 2/3, 0, 1: the fraction of images it fires
    assert_unit_scores(scores, "fc2", torch.tensor([1.0, 0.0]))
    assert set(scores) == set(dense_mask(net, True))


def test_the_score_is_the_mean_over_every_image_of_the_first_batches():
    net, x = RankNet().eval(), images()
    # Batches of 2 and 1 images, then one more that `batches: 2` must not read: the mean over the
    # 3 images is neither the mean of the two batch means nor the last batch's.
    data = [(x[:2], labels(2)), (x[2:], labels(1)), (x[:1], labels(1))]
    two = hrank(net, data, batches=2)
    assert_unit_scores(two, "conv", PER_IMAGE.mean(0))
    assert_unit_scores(two, "fc1", FC1.mean(0))
    assert not torch.allclose(PER_IMAGE.mean(0), (PER_IMAGE[:2].mean(0) + PER_IMAGE[2]) / 2)
    three = hrank(net, data, batches=3)  # A counted twice
    assert_unit_scores(three, "conv", torch.cat([PER_IMAGE, PER_IMAGE[:1]]).mean(0))
    short = hrank(net, data[:1], batches=5)  # fewer batches than asked: the mean of those there are
    assert_unit_scores(short, "conv", PER_IMAGE[:2].mean(0))


def test_only_masked_layers_are_scored_and_their_weights_without_biases():
    net = RankNet().eval()
    crit = get_criterion("hrank")
    mask = {"conv.weight": torch.ones(5, 1, 5, 5, dtype=torch.bool)}
    scores = crit.score(net, mask, ScoreInputs(torch.Generator(), (1, N, N), 2, iter([(images(), labels(3))])),
                        crit.Params())
    assert list(scores) == ["conv.weight"]
    assert torch.equal(scores["conv.weight"][:, 0, 0, 0], PER_IMAGE.mean(0).float())


def test_scoring_leaves_weights_statistics_mode_and_hooks_as_they_were():
    net = RankNet()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial statistics, so an update would show
        net.bn.running_mean.uniform_(-1, 1, generator=g)
        net.bn.running_var.uniform_(0.5, 2, generator=g)
    x = torch.randn(8, 1, N, N, generator=g)
    for mode in ("eval", "train"):
        model = copy.deepcopy(net)
        before = copy.deepcopy(model.state_dict())  # parameters and buffers (num_batches_tracked too)
        with scoring_mode(model, mode):  # as the score stage calls it (prune.bn_mode)
            hrank(model, [(x, labels(8))], batches=1)
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()), mode
        assert model.training and all(not m._forward_hooks for m in model.modules())
    model = copy.deepcopy(net).eval()  # called directly: the mode it is given, left as it was
    before = copy.deepcopy(model.state_dict())
    hrank(model, [(x, labels(8))], batches=1)
    assert not model.training and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="hrank: no feature map reached conv, fc1, fc2"):
        hrank(model, [], batches=1)
    assert all(not m._forward_hooks for m in model.modules())  # removed on the error too


def test_map_ranks_refuses_what_is_not_a_map():
    from pai_core.criteria.hrank import map_ranks

    assert torch.equal(map_ranks(torch.tensor([[2.0, -1.0, 0.0]])), torch.tensor([[1, 0, 0]]))
    with pytest.raises(ValueError, match=r"hrank ranks 2-D feature maps; got an output of shape \(1, 2, 3, 3, 3\)"):
        map_ranks(torch.ones(1, 2, 3, 3, 3))


# ---------------------------------------------------------------- specs and the flow

CONV2BN = {"name": "conv2", "width": 0.25, "batch_norm": True}


def hrank_raw(**prune) -> dict:
    return tiny_raw("prune_after_training", model=CONV2BN, train={"epochs": 1},
                    prune={"criterion": "hrank", "schedule": "one_shot", "sparsity": 0.5, "rate": None, "rounds": 1,
                           "scope": "layerwise", "structure": "filter", **prune})


def upstream(node, out: dict | None = None) -> list:
    """`node` and every node it needs, dependencies first."""
    out = {} if out is None else out
    for dep in node.inputs.values():
        upstream(dep, out)
    out.setdefault(node.key, node)
    return list(out.values())


def hand_ranks(model: nn.Module, batches: list) -> dict[str, torch.Tensor]:
    """Per layer of conv2-bn, the mean rank of each unit's map after its BN and ReLU, one 2-D
    map at a time (the fc neurons: the fraction of images with a positive output)."""
    per: dict[str, list[torch.Tensor]] = {n: [] for n in ("features.conv1", "features.conv2", "fc1", "fc2")}
    f = model.features
    with torch.no_grad():
        for x, _ in batches:
            a = f.relu1(f.bn1(f.conv1(x)))
            b = f.relu2(f.bn2(f.conv2(a)))
            h1 = torch.relu(model.fc1(model.flatten(f.pool1(b))))
            h2 = torch.relu(model.fc2(h1))
            for name, y in (("features.conv1", a), ("features.conv2", b)):
                per[name] += [torch.tensor([float(torch.linalg.matrix_rank(img[c])) for c in range(len(img))])
                              for img in y]
            per["fc1"] += list((h1 > 0).double())
            per["fc2"] += list((h2 > 0).double())
    return {n: torch.stack(v).double().mean(0) for n, v in per.items()}


def test_pat_flow_removes_exactly_the_lowest_rank_filters_of_each_layer(tmp_path):
    spec = parse_spec(hrank_raw())
    mask_node = build_plan(spec).rounds[1].mask
    score_node = mask_node.inputs["scores"]
    assert score_node.fields["bn_mode"] == "eval" and score_node.fields["params"] == {"batches": 5}
    assert mask_node.fields["filter_norm"] == "max"
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(upstream(mask_node), rt)
    weights = refs[score_node.inputs["weights"].key]
    model = model_from(weights, rt.store.load(weights), rt).eval()
    batches = [b for _, b in zip(range(5), first_batches(score_node.fields["data"], rt))]
    assert sum(len(x) for x, _ in batches) == 250
    ranks = hand_ranks(model, batches)
    mask = rt.store.load(refs[mask_node.key])["mask"]
    reordered = 0
    for layer, r in ranks.items():
        keep = torch.zeros(len(r), dtype=torch.bool)
        keep[torch.sort(r, descending=True, stable=True).indices[:round(len(r) * 0.5)]] = True
        assert torch.equal(mask[f"{layer}.weight"].flatten(1).any(1), keep), layer
        reordered += not torch.equal(keep, torch.arange(len(r)) < round(len(r) * 0.5))
    assert reordered == 4  # the ranks, not the unit order, chose in every layer
    assert len(set(ranks["features.conv2"].tolist())) > 1
    assert mask["fc3.weight"].flatten(1).any(1).all()  # the output units stay


def test_the_example_config_validates_and_shares_the_taylor_configs_pretrain():
    spec = load_spec(ROOT / "configs/pat/hrank_conv4bn_fashion.yaml")
    assert (spec.prune.criterion, spec.prune.scope, spec.prune.norm) == ("hrank", "layerwise", "max")
    plan = build_plan(spec)
    taylor = build_plan(load_spec(ROOT / "configs/pat/taylor_filter_conv4bn_fashion.yaml"))
    assert plan.rounds[0].trained.key == taylor.rounds[0].trained.key
    assert plan.rounds[1].mask.inputs["scores"].fields["params"] == {"batches": 5}


def refused(raw: dict) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    return str(e.value)


@pytest.mark.parametrize("prune, starts", [
    ({"structure": "unstructured", "scope": "global"},
     "prune.structure: hrank scores whole filters/neurons; allowed: filter"),
    ({"filter_norm": "l1"}, "prune.filter_norm: hrank gives every weight of a unit the unit's score"),
    ({"params": {"batches": 0}}, "prune.params.batches: Input should be greater than 0"),
    ({"params": {"batches": 10_001}}, "prune.params.batches: Input should be less than or equal to 10000"),
    ({"params": {"limit": 5}}, "prune.params.limit: unknown field; allowed: batches"),
])
def test_bad_options_are_refused_naming_the_field(prune, starts):
    msg = refused(hrank_raw(**prune))
    assert msg.startswith(starts), msg
