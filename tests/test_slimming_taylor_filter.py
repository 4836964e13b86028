"""Network slimming (train.bn_l1 + criterion bn_scale, global filter selection) and the
filter-level Taylor criterion (taylor_filter), each against a hand computation on a tiny net."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, tiny_raw
from pai_core.criteria import ScoreInputs, get_criterion
from pai_core.data import load
from pai_core.masks import apply_mask, dense_mask
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.spec_io import SpecError, load_spec, parse_spec
from pai_core.stages import Runtime, run_plan
from pai_core.stages.train import SlimmingL1
from pai_core.store import Store
from pai_core.structured import bn_after, chain, filter_scores, physically_prune, select_filters
from pai_core.training import TrainState

BN_LAYERS = ["features.conv1", "features.conv2", "features.conv3", "features.conv4"]


def conv4bn(seed: int = 0) -> nn.Module:
    """conv4 with BatchNorm at a quarter width: convs of 16, 16, 32, 32 channels on 1×16×16."""
    return build_model("conv4", (1, 16, 16), 10, seed=seed, width=0.25, batch_norm=True)


def set_gammas(model: nn.Module, values: dict[str, list[float]]) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for layer, bn in bn_after(model).items():
            modules[bn].weight.copy_(torch.tensor(values[layer]))


# ---------------------------------------------------------------- the L1 subgradient

def test_bn_l1_changes_exactly_the_bn_scale_grads_by_lambda_sign_gamma():
    model = conv4bn()
    g = torch.Generator().manual_seed(1)
    set_gammas(model, {n: (torch.randn(m.weight.shape[0], generator=g)).tolist() for n, m in chain(model)[:4]})
    model.features.bn2.weight.data[3] = 0.0  # sign(0) = 0: no push (the reference's torch.sign)
    x, y = torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    F.cross_entropy(model(x), y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    lam = 1e-2
    SlimmingL1(lam).after_backward(TrainState(model, None, None, 0, 1, 1, 1))
    bn_scales = {f"{bn}.weight" for bn in bn_after(model).values()}
    assert len(bn_scales) == 4
    params = dict(model.named_parameters())
    for n, p in params.items():
        if n in bn_scales:
            sign = torch.sign(p.detach())
            assert torch.equal(p.grad, before[n] + lam * sign)
            assert (p.grad != before[n]).sum() == (sign != 0).sum()
        else:
            assert torch.equal(p.grad, before[n]), n  # biases β, convs, fcs: untouched


def slim_raw(**prune) -> dict:
    return tiny_raw("prune_after_training", model={"name": "conv2", "width": 0.25, "batch_norm": True},
                    prune={"criterion": "bn_scale", "schedule": "one_shot", "sparsity": 0.5, "rate": None,
                           "rounds": 1, "scope": "global", "structure": "filter", **prune})


def test_the_train_stage_applies_bn_l1_in_each_step(tmp_path):
    """One plain SGD step (no momentum, no decay) with and without λ: the BN scales, and only
    they, differ by lr·λ·sign(γ₀) (γ₀ = 1 at init)."""
    lr, lam = 0.1, 0.01
    trained = {}
    for l1 in (0.0, lam):
        raw = slim_raw()
        raw["train"] = {"optimizer": "sgd", "lr": lr, "iterations": 1, "bn_l1": l1}
        plan = build_plan(parse_spec(raw))
        pretrain = plan.rounds[0].trained
        rt = Runtime(Store(tmp_path / str(l1)), "cpu")
        refs = run_plan([pretrain.inputs["start"], pretrain], rt)
        trained[l1] = rt.store.load(refs[pretrain.key])["model"]
    scales = {"features.bn1.weight", "features.bn2.weight"}
    for n, w in trained[0.0].items():
        if n in scales:
            torch.testing.assert_close(trained[lam][n], w - lr * lam, rtol=0, atol=1e-6)  # lr·λ = 1e-3
        else:
            assert torch.equal(trained[lam][n], w), n


# ---------------------------------------------------------------- bn_scale, global

def test_bn_scale_ranks_channels_by_exactly_abs_gamma_across_layers():
    model = conv4bn()
    # conv1 has 9 weights per filter, conv3 144: a norm of the per-weight scores would rank
    # conv3's |γ| = 0.1 above conv1's 0.5 (14.4 > 4.5); the ranking must be |γ| itself.
    # conv2's scales are all tiny: the paper's single threshold would empty it.
    gammas = {  # no two |γ| closer than 0.002, so float32 keeps their order
        "features.conv1": [0.5 - 0.01 * i for i in range(16)],      # 0.500 .. 0.350
        "features.conv2": [-1e-3 * (i + 1) for i in range(16)],     # signs do not matter: |γ|
        "features.conv3": [0.105 + 0.02 * i for i in range(32)],    # 0.105 .. 0.725
        "features.conv4": [0.897 - 0.02 * i for i in range(32)],    # 0.897 .. 0.277
    }
    set_gammas(model, gammas)
    scores = get_criterion("bn_scale").score(model, dense_mask(model), None, None)
    for layer in BN_LAYERS:  # every weight (and only) of filter c carries |γ_c|
        want = torch.tensor(gammas[layer]).abs()
        assert torch.equal(scores[f"{layer}.weight"], want[:, None, None, None].expand_as(scores[f"{layer}.weight"]))
    top = 1 + max(float(torch.tensor(vs).abs().max()) for vs in gammas.values())
    assert all(torch.equal(scores[f"{n}.weight"], torch.full_like(scores[f"{n}.weight"], top))
               for n in ("fc1", "fc2", "fc3"))
    unit = filter_scores(model, scores, "max", "batch_norm")
    assert list(unit) == BN_LAYERS
    flat = torch.cat([unit[n] for n in BN_LAYERS])
    assert torch.equal(flat, torch.cat([torch.tensor(gammas[n]).abs() for n in BN_LAYERS]))

    previous = dense_mask(model)
    mask = select_filters(model, scores, previous, 0.5, "max", scope="global", layers="batch_norm")
    kept = {n: mask[f"{n}.weight"].flatten(1).any(1) for n in BN_LAYERS}
    # By hand: 96 channels, keep 48. conv2 keeps only its best (|γ| = 0.016, index 15), the floor
    # that stops one threshold from emptying it; the other 47 are the largest |γ| of the rest.
    pool = sorted(((abs(v), n, i) for n in BN_LAYERS if n != "features.conv2"
                   for i, v in enumerate(gammas[n])), key=lambda t: -t[0])[:47]
    expect = {n: torch.zeros(len(gammas[n]), dtype=torch.bool) for n in BN_LAYERS}
    for _, n, i in pool:
        expect[n][i] = True
    expect["features.conv2"][15] = True
    assert all(torch.equal(kept[n], expect[n]) for n in BN_LAYERS)
    assert sum(int(k.sum()) for k in kept.values()) == 48
    assert all(mask[f"{n}.weight"].flatten(1).any(1).all() for n in ("fc1", "fc2"))  # no BN: not candidates
    # A kept channel's next-layer inputs stay; a dropped one's go (its dependent channels).
    assert torch.equal(mask["features.conv2.weight"].flatten(2).any(2).any(0), kept["features.conv1"])
    # l1 over the same per-weight scores weights |γ| by filter size: a different mask.
    l1 = select_filters(model, scores, previous, 0.5, "l1", scope="global", layers="batch_norm")
    assert not torch.equal(l1["features.conv1.weight"], mask["features.conv1.weight"])


def test_global_filter_selection_counts_and_layerwise_is_unchanged():
    model = conv4bn()
    g = torch.Generator().manual_seed(3)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters() if n in dense_mask(model)}
    prev = dense_mask(model)
    units = sum(layer.weight.shape[0] for _, layer in chain(model)[:-1])  # 16+16+32+32+64+64 = 224
    glob = select_filters(model, scores, prev, 0.3, "l2", scope="global")
    assert sum(int(glob[f"{n}.weight"].flatten(1).any(1).sum()) for n, _ in chain(model)[:-1]) == round(units * 0.3)
    # Layerwise by default, as before: each layer keeps round(n · d) by its l1 norm.
    lw = select_filters(model, scores, prev, 0.3, "l1")
    for n, layer in chain(model)[:-1]:
        s = scores[f"{n}.weight"].flatten(1).sum(1)
        want = torch.zeros_like(s, dtype=torch.bool)
        want[torch.sort(s, descending=True, stable=True).indices[:round(len(s) * 0.3)]] = True
        assert torch.equal(lw[f"{n}.weight"].flatten(1).any(1), want)


def test_physically_pruned_slimmed_net_equals_the_masked_one():
    model = conv4bn().eval()
    g = torch.Generator().manual_seed(2)
    for m in model.modules():  # non-trivial statistics and shifts, so a leaking channel would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1, generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)
            m.weight.data.uniform_(-1, 1, generator=g)
            m.bias.data.uniform_(-1, 1, generator=g)
    scores = get_criterion("bn_scale").score(model, dense_mask(model), None, None)
    mask = select_filters(model, scores, dense_mask(model), 0.4, "max", scope="global", layers="batch_norm")
    masked = copy.deepcopy(model)
    apply_mask(masked, mask)
    small = physically_prune(model, mask).eval()
    x = torch.randn(6, 1, 16, 16, generator=g)
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
    assert sum(small.features.get_submodule(f"bn{i}").num_features for i in range(1, 5)) == round(96 * 0.4)


# ---------------------------------------------------------------- taylor_filter

class TwoFilter(nn.Module):
    """A 2-filter 2×2 conv on 1×2×2 inputs (one output position), ReLU, then Linear(2 -> 3)."""

    def __init__(self, bn: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 2)
        self.bn = nn.BatchNorm2d(2) if bn else nn.Identity()
        self.fc = nn.Linear(2, 3)
        self.gate = None  # set to a tensor: multiplies the unit outputs (after the BN, if any)

    def forward(self, x):
        z = self.bn(self.conv(x))
        if self.gate is not None:
            z = z * self.gate.view(1, -1, 1, 1)
        return self.fc(torch.relu(z).flatten(1))


def batches(n: int = 2):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(6, 1, 2, 2, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


def taylor_filter(net, form, data, bn_train=False):
    crit = get_criterion("taylor_filter")
    net.train(bn_train)
    return crit.score(net, dense_mask(net), ScoreInputs(torch.Generator(), (1, 2, 2), 3, iter(data)),
                      crit.Params(batches=len(data), form=form))


def test_taylor_filter_is_the_squared_sum_of_g_times_w_per_filter_averaged_over_batches():
    net, data = TwoFilter(), batches()
    scores = taylor_filter(net, "weight", data)
    w, b = net.conv.weight.detach().reshape(2, 4), net.conv.bias.detach()
    v = net.fc.weight.detach()
    want = torch.zeros(2)
    for x, y in data:  # backprop by hand
        xs = x.reshape(len(x), 4)
        z = xs @ w.T + b                                              # (N, 2): the one output position
        d_out = (torch.softmax(torch.relu(z) @ v.T + net.fc.bias.detach(), 1) - F.one_hot(y, 3)) / len(y)
        d_z = (d_out @ v) * (z > 0)                                   # ∂L/∂z
        g = d_z.T @ xs                                                # ∂L/∂W, (2, 4)
        want += (g * w).sum(1).square()                               # (Σ_s g_s w_s)² per filter
    want /= len(data)
    for f in range(2):
        assert torch.allclose(scores["conv.weight"][f], want[f].expand(1, 2, 2), rtol=1e-5, atol=1e-12)
    assert not torch.allclose(want[0], want[1])
    # Not the per-weight criterion summed: Σ_s (g_s w_s)² is another number.
    per_weight = get_criterion("taylor").score(net, dense_mask(net), ScoreInputs(torch.Generator(), (1, 2, 2), 3,
                                               iter(data)), get_criterion("taylor").Params(batches=2))
    assert not torch.allclose(per_weight["conv.weight"].flatten(1).sum(1), want)


@pytest.mark.parametrize("bn", [False, True])
def test_taylor_gate_form_is_the_squared_gradient_of_a_gate_on_the_unit(bn):
    """Gate after BN: (γ ∂L/∂γ + β ∂L/∂β)² equals (∂L/∂gate)² of an explicit gate; without BN
    the gate sits on the conv output, (Σ g·w + g_b·b)²."""
    net, data = TwoFilter(bn=bn), batches(3)
    if bn:
        with torch.no_grad():
            net.bn.weight.copy_(torch.tensor([0.7, -1.3]))
            net.bn.bias.copy_(torch.tensor([0.2, 0.4]))
    scores = taylor_filter(copy.deepcopy(net), "gate", data, bn_train=True)
    gated = copy.deepcopy(net).train()
    gated.gate = torch.ones(2, requires_grad=True)
    want = torch.zeros(2)
    for x, y in data:
        (g,) = torch.autograd.grad(F.cross_entropy(gated(x), y), [gated.gate])
        want += g.square()
    want /= len(data)
    torch.testing.assert_close(scores["conv.weight"][:, 0, 0, 0], want, rtol=1e-5, atol=1e-12)
    assert torch.equal(scores["conv.weight"], scores["conv.weight"][:, :1, :1, :1].expand(2, 1, 2, 2))


def test_taylor_filter_scores_read_exactly_by_filter_max():
    model, data = conv4bn(), load("synthetic")
    crit = get_criterion("taylor_filter")
    batch = [(data.train.x[i:i + 20], data.train.y[i:i + 20]) for i in range(0, 60, 20)]
    scores = crit.score(model, dense_mask(model), ScoreInputs(torch.Generator(), (1, 16, 16), 10, iter(batch)),
                        crit.Params(batches=3))
    unit = filter_scores(model, scores, "max")
    for n, layer in chain(model)[:-1]:
        assert torch.equal(scores[f"{n}.weight"], unit[n].reshape(-1, *[1] * (layer.weight.dim() - 1))
                           .expand_as(layer.weight))


# ---------------------------------------------------------------- specs, keys, plans

PINNED = {  # computed with the code before this change (git HEAD 9ec0ddc)
    "pat/structured_lenet5_fashion.yaml": {
        ("dense", "pretrain"): "05029f9c73a4d1186522", ("round 1", "score"): "63fb77c9e9741fa91d75",
        ("round 1", "mask"): "d0929e677960e82f04f1", ("round 1", "finetune"): "a582ab8bb56309d5050d",
        ("round 1", "evaluate"): "a6ddc8ab441584bdd346"},
    "early_bird/conv2_fashion.yaml": {
        ("dense", "pretrain"): "da378f719e6a98ca7c50", ("early-bird", "eb_search"): "f671ce611907b0eaa727",
        ("early-bird", "retrain"): "b4dc52c18573fa8bf126", ("early-bird", "evaluate"): "b494cb13a3b28418c7c0"},
    "pat/taylor_lenet300_mnist.yaml": {
        ("dense", "pretrain"): "7b675c79ac8bec9a76eb", ("round 1", "score"): "0dbb9eca1c57fee2c895",
        ("round 1", "mask"): "1175a8709834ac1d3e0d", ("round 1", "evaluate"): "b08751a0967ddef9203b"},
}


def roles(path, *overrides):
    plan = build_plan(load_spec(path, list(overrides)))
    return {(r.name, n.role): n.key for r, nodes in zip(plan.rounds, plan.nodes_by_round()) for n in nodes}


@pytest.mark.parametrize("config", sorted(PINNED))
def test_existing_configs_keep_their_keys(config):
    keys = roles(ROOT / "configs" / config)
    assert {k: keys[k] for k in PINNED[config]} == PINNED[config]


def test_bn_l1_enters_the_pretrain_key_only_when_set():
    path = ROOT / "configs/pat/slimming_conv4bn_fashion.yaml"
    base = roles(path)
    assert roles(path, "train.bn_l1=0.0") == roles(path, "train.bn_l1=0") != base
    other = roles(path, "train.bn_l1=0.001")
    assert other[("dense", "pretrain")] != base[("dense", "pretrain")]
    assert other[("dense", "init")] == base[("dense", "init")]


def test_new_configs_validate_and_plan_global_filter_masks():
    slim = load_spec(ROOT / "configs/pat/slimming_conv4bn_fashion.yaml")
    taylor = load_spec(ROOT / "configs/pat/taylor_filter_conv4bn_fashion.yaml")
    assert slim.train.bn_l1 > 0 and slim.prune.norm == "max" and slim.prune.unit_layers == "batch_norm"
    assert taylor.prune.norm == "max" and taylor.prune.unit_layers == "all"
    for spec, layers in ((slim, {"filter_layers": "batch_norm"}), (taylor, {})):
        fields = build_plan(spec).rounds[1].mask.fields
        assert fields == {"density": fields["density"], "scope": "global", "min_density": 0.0, "on_collapse": "error",
                          "structure": "filter", "filter_norm": "max", **layers}


def refused(raw: dict) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def lenet_pat(**prune) -> dict:
    return tiny_raw("prune_after_training", model={"name": "lenet5"},
                    prune={"schedule": "one_shot", "sparsity": 0.5, "rate": None, "rounds": 1, **prune})


@pytest.mark.parametrize("raw, starts", [
    (tiny_raw("prune_after_training", train={"bn_l1": 1e-4}), "train.bn_l1: network slimming's L1 acts on BatchNorm"),
    (tiny_raw("prune_after_training", retrain={"bn_l1": 1e-4}), "retrain.bn_l1: network slimming's L1"),
    (tiny_raw("prune_after_training", train={"bn_l1": -1}), "train.bn_l1: Input should be greater than or equal to 0"),
    (tiny_raw("early_bird", model={"name": "conv2", "batch_norm": True}, train={"bn_l1": 1e-4, "epochs": 6},
              prune={"schedule": "one_shot", "sparsity": 0.5, "rate": None, "rounds": 1}),
     "train.bn_l1: the channel search applies early_bird.l1"),
    (slim_raw(structure="unstructured"), "prune.structure: bn_scale scores whole filters/neurons; allowed: filter"),
    (slim_raw(filter_norm="l1"), "prune.filter_norm: bn_scale gives every weight of a unit the unit's score"),
    (slim_raw(filter_layers="all"), "prune.filter_layers: bn_scale scores the channels a BatchNorm follows"),
    (slim_raw(filter_layers="unshared"), "prune.filter_layers: bn_scale scores the channels a BatchNorm follows"),
    (slim_raw(scope="erk"), "prune.scope: structure filter ranks the filters of each layer"),
    (slim_raw(sparsity=0.99), "prune.sparsity: the mask keeps 0 of the"),  # 32 BN channels, 2 layers
    (slim_raw(schedule="gradual", criterion="magnitude"), "prune.schedule: structure filter prunes one_shot or iterative"),
    (lenet_pat(criterion="bn_scale", structure="filter", scope="global"),
     "prune.criterion: bn_scale ranks BatchNorm scales, and this lenet5 has no BatchNorm"),
    (lenet_pat(structure="filter", scope="layerwise", filter_layers="batch_norm"),
     "prune.filter_layers: batch_norm prunes BN channels, and this lenet5 has no BatchNorm"),
    (lenet_pat(filter_norm="l2"), "prune.filter_norm: only structure filter uses it"),
    (lenet_pat(criterion="taylor_filter"), "prune.structure: taylor_filter scores whole filters/neurons"),
    (lenet_pat(criterion="taylor_filter", structure="filter", params={"form": "grad"}),
     "prune.params.form: Input should be 'gate' or 'weight'"),
])
def test_bad_options_are_refused_naming_the_field(raw, starts):
    assert refused(raw).startswith(starts)


def test_global_filters_refuse_a_schedule_that_keeps_fewer_filters_than_layers():
    # conv2 at width 0.25 with BN: 2 BN layers of 16 channels; 0.95 keeps round(1.6) = 2: fine, 0.97 keeps 1.
    parse_spec(slim_raw(sparsity=0.95))
    assert refused(slim_raw(sparsity=0.97)).startswith("prune.sparsity: the mask keeps 1 of the 32 prunable filters")


@pytest.mark.slow
def test_slimming_end_to_end_prunes_bn_channels_and_the_small_net_scores_the_same(tmp_path):
    raw = slim_raw(physical=True)
    raw["train"] |= {"bn_l1": 1e-3, "epochs": 1}
    spec = parse_spec(raw)
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    mask = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    kept = [int(mask[f"features.conv{i}.weight"].flatten(1).any(1).sum()) for i in (1, 2)]
    assert sum(kept) == 16 and min(kept) >= 1  # half of the 32 BN channels, one global ranking
    assert mask["fc1.weight"].flatten(1).any(1).all()  # fc1 has no BN: all its neurons stay
    info = refs[plan.rounds[1].mask.key].info.structured
    assert info["pruned"]["parameters"] < info["dense"]["parameters"]
    ev = refs[plan.rounds[1].evaluate.key].info
    assert abs(ev.physical.test_acc - ev.test_acc) <= 1 / 200  # at most a near-tie flips
