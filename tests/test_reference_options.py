"""What reference codes do that a spec can now say: open_lth's BatchNorm weights U(0, 1),
PyTorch's default biases, VGG head over a 2x2 map and fresh optimizer at the rewind point;
Renda et al.'s momentum kept through LR rewinding. Each against a hand computation, and each
leaving the keys of specs that do not use it alone."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_raw, tiny_spec
from pai_core.data import load
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.plan import init_node
from pai_core.spec_io import SpecError, parse_spec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.training import train

CIFAR = (3, 32, 32)


def _bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


# ---------------------------------------------------------------- model init options

def test_uniform_batchnorm_init_draws_weights_in_0_1_and_touches_nothing_else():
    plain = build_model("resnet20", CIFAR, 10, seed=3)
    uni = build_model("resnet20", CIFAR, 10, seed=3, bn_init="uniform")
    again = build_model("resnet20", CIFAR, 10, seed=3, bn_init="uniform")
    for bn in _bns(uni):
        assert torch.all((bn.weight >= 0) & (bn.weight < 1)) and bn.weight.unique().numel() == bn.weight.numel()
        assert torch.all(bn.bias == 0)
    bn_weights = {f"{n}.weight" for n, m in uni.named_modules() if isinstance(m, nn.BatchNorm2d)}
    a, b = plain.state_dict(), uni.state_dict()
    assert bn_weights and all(torch.equal(a[k], b[k]) for k in a if k not in bn_weights)  # drawn after the builder
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in b.items())  # from the seed alone


def test_torch_bias_init_is_pytorchs_default_uniform_and_keeps_every_weight():
    plain = build_model("vgg16", CIFAR, 10, seed=0)
    torchb = build_model("vgg16", CIFAR, 10, seed=0, bias_init="torch")
    layers = [m for m in torchb.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers:
        bound = 1 / math.sqrt(m.weight[0].numel())  # conv: in_channels * 9; fc: 512
        assert torch.all(m.bias.abs() <= bound) and m.bias.abs().max() > bound / 2
    assert layers[-1].weight.shape[1] == 512 and layers[0].weight[0].numel() == 27
    a, b = plain.state_dict(), torchb.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("bias") or "bn" in k)


def test_torch_weight_init_is_pytorchs_default_uniform_and_leaves_biases_and_batchnorm():
    plain = build_model("vgg16", CIFAR, 10, seed=0, bias_init="torch", bn_init="uniform")
    torchw = build_model("vgg16", CIFAR, 10, seed=0, bias_init="torch", bn_init="uniform", weight_init="torch")
    layers = [m for m in torchw.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers:
        bound = 1 / math.sqrt(m.weight[0].numel())  # kaiming_uniform_(a=√5): U(±1/sqrt(fan_in))
        assert torch.all(m.weight.abs() <= bound) and m.weight.abs().max() > 0.99 * bound
        assert abs(m.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # uniform, not Kaiming normal
    a, b = plain.state_dict(), torchw.state_dict()
    weights = {f"{n}.weight" for n, m in torchw.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert all(torch.equal(a[k], b[k]) for k in a if k not in weights)  # drawn after the biases and BN
    assert all(not torch.equal(a[k], b[k]) for k in weights)


def test_kaiming_normal_weight_init_redraws_every_weight_with_fan_in():
    plain = build_model("resnet50", (3, 32, 32), 10, seed=0)
    redrawn = build_model("resnet50", (3, 32, 32), 10, seed=0, weight_init="kaiming_normal")
    layers = [(n, m) for n, m in redrawn.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name, m in layers:
        fan_in = m.weight[0].numel()
        if m.weight.numel() >= 4096:  # enough draws for the std to be within 5 %
            assert abs(m.weight.std().item() / math.sqrt(2 / fan_in) - 1) < 0.05, name
    conv = redrawn.layer4[0].conv1  # torchvision's own init is fan_out: 512·1·1 against fan_in 1024
    assert abs(conv.weight.std().item() / math.sqrt(2 / 1024) - 1) < 0.05
    a, b = plain.state_dict(), redrawn.state_dict()
    weights = {f"{n}.weight" for n, _ in layers}
    assert all(torch.equal(a[k], b[k]) for k in a if k not in weights)


def test_default_options_are_dropped_so_keys_do_not_change():
    base = tiny_raw(model={"name": "resnet20"})
    stated = tiny_raw(model={"name": "resnet20", "bn_init": "model", "bias_init": "model", "weight_init": "model"})
    assert init_node(parse_spec(base)).key == init_node(parse_spec(stated)).key
    other = tiny_raw(model={"name": "resnet20", "bn_init": "uniform"})
    assert init_node(parse_spec(other)).key != init_node(parse_spec(base)).key


@pytest.mark.parametrize("model", [{"name": "lenet_300_100"}, {"name": "conv2", "batch_norm": False}])
def test_uniform_batchnorm_on_a_net_without_batchnorm_is_refused(model):
    with pytest.raises(SpecError, match=r"model\.bn_init: .* has no BatchNorm here; allowed: model"):
        parse_spec(tiny_raw(model={**model, "bn_init": "uniform"}))
    with pytest.raises(SpecError, match=r"model\.bias_init: Input should be 'model' or 'torch'"):
        parse_spec(tiny_raw(model={**model, "bias_init": "zero"}))


def test_vgg16_without_its_last_max_pool_is_open_lths_cifar_vgg():
    """open_lth's cifar_vgg_16: the plan's four 'M's, then AvgPool2d(2) over the 2x2 map, fc(512, 10)."""
    net = build_model("vgg16", CIFAR, 10, seed=0, last_pool=False).eval()
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 4
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = sum(c_out * (c_in * 9 + 1) + 2 * c_out for c_in, c_out in zip([3] + widths[:-1], widths))
    assert sum(p.numel() for p in net.parameters()) == convs + 512 * 10 + 10 == 14_728_266
    x = torch.randn(4, *CIFAR)
    by_hand = net.fc(F.avg_pool2d(net.features(x), 2).flatten(1))
    assert net.features(x).shape[-2:] == (2, 2)
    assert torch.allclose(net(x), by_hand, atol=0, rtol=0)
    with pytest.raises(SpecError, match=r"model\.last_pool: unknown field for lenet_300_100"):
        parse_spec(tiny_raw(model={"name": "lenet_300_100", "last_pool": False}))


# ---------------------------------------------------------------- a fresh optimizer at the rewind point

def _train_from(weights: dict, spec, mask, start_iter: int, optimizer_state) -> dict:
    """What the train stage should compute: spec's retraining of these weights under the mask, from
    `start_iter`, with that optimizer state (None: a new optimizer)."""
    data = load("synthetic")
    model = build_model("lenet_300_100", data.in_shape, data.num_classes, seed=0)
    model.load_state_dict(weights)
    train(model, data, spec.retrain_spec, batch_size=50, order_seed=spec.order_seed, mask=mask,
          start_iter=start_iter, optimizer_state=optimizer_state)
    return model.state_dict()


def _lth(k: int, choice: str | None, **extra) -> dict:
    prune = {"rewind_iter": k} | ({"rewind_optimizer": choice} if choice else {})
    return tiny_raw(prune=prune, **extra)


def test_fresh_rewinding_changes_only_the_retrainings_and_nothing_at_k0():
    keys = lambda raw: [n.key for n in build_plan(parse_spec(raw)).nodes]  # noqa: E731
    assert keys(_lth(0, "fresh")) == keys(_lth(0, None)) == keys(_lth(0, "restore"))
    restore, fresh = build_plan(parse_spec(_lth(3, None))), build_plan(parse_spec(_lth(3, "fresh")))
    assert restore.rounds[0].trained.key == fresh.rounds[0].trained.key  # pretraining
    assert restore.rounds[1].mask.key == fresh.rounds[1].mask.key        # round 1's mask: from the pretraining
    for a, b in zip(restore.rounds[1:], fresh.rounds[1:]):
        assert b.trained.fields == {**a.trained.fields, "optimizer_state": "fresh"}
        assert a.trained.inputs["start"].key == b.trained.inputs["start"].key  # the same w_k
        assert "optimizer_state" not in a.trained.fields


def test_a_fresh_optimizer_lets_retrain_use_another_one():
    adam = {"optimizer": "adam", "lr": 1e-3, "epochs": 2}
    with pytest.raises(SpecError, match="retrain.optimizer must equal train.optimizer"):
        parse_spec(_lth(3, "restore", retrain=adam))
    parse_spec(_lth(3, "fresh", retrain=adam))
    with pytest.raises(SpecError, match=r"prune\.rewind_optimizer: Input should be 'restore' or 'fresh'"):
        parse_spec(_lth(3, "new"))


def test_fresh_rewinding_retrains_from_w_k_with_no_momentum(tmp_path):
    spec = tiny_spec(prune={"rewind_iter": 7, "rewind_optimizer": "fresh", "rounds": 1})
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    retrain = plan.rounds[1].trained
    w_k = rt.store.load(refs[retrain.inputs["start"].key])
    assert w_k["optimizer"] is not None  # there was momentum to restore
    mask = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    got = rt.store.load(refs[retrain.key])["model"]

    fresh = _train_from(w_k["model"], spec, mask, 7, None)
    assert all(torch.equal(got[k], v) for k, v in fresh.items())
    kept = _train_from(w_k["model"], spec, mask, 7, w_k["optimizer"])
    assert any(not torch.equal(kept[k], v) for k, v in fresh.items())  # the momentum made a difference


def test_instability_with_fresh_rewinding_shares_lths_fresh_retrainings():
    raw = tiny_raw("instability", instability={"rewind_iters": [0, 3], "alphas": 5, "rewind_optimizer": "fresh"},
                   prune={"rate": 0.5, "rounds": 2})
    plan = build_plan(parse_spec(raw))
    pretrain = build_plan(parse_spec(tiny_raw(prune={"rate": 0.5, "rounds": 2}))).rounds[0].trained
    k0, k3 = ([r for r in plan.rounds if r.rewind_iter == k] for k in (0, 3))
    assert k0[0].trained.key == pretrain.key  # at k = 0 the pretraining is a first copy as ever
    first = k3[0].trained  # at k > 0 it kept its optimizer past k: a new training from w_k
    assert first.key != pretrain.key and first.fields["optimizer_state"] == "fresh" and first.fields["stop_iter"] is None
    assert first.inputs["start"].fields["stop_iter"] == 3
    lth = build_plan(parse_spec(tiny_raw(prune={"rate": 0.5, "rounds": 2, "rewind_iter": 3,
                                                "rewind_optimizer": "fresh"})))
    assert [r.trained.key for r in k3[1:]] == [r.trained.key for r in lth.rounds[1:]]
    assert all(r.analysis.inputs["b"].fields.get("optimizer_state") == "fresh" for r in k3)
    assert not any("optimizer_state" in r.analysis.inputs["b"].fields for r in k0)


# ---------------------------------------------------------------- LR rewinding keeping the momentum

def _lrr(optimizer: str | None) -> dict:
    raw = tiny_raw("lr_rewinding")
    raw["prune"] = {"rate": 0.5, "rounds": 1} | ({"optimizer": optimizer} if optimizer else {})
    return raw


def test_lr_rewinding_can_keep_the_trained_nets_momentum(tmp_path):
    fresh, keep = build_plan(parse_spec(_lrr("fresh"))), build_plan(parse_spec(_lrr("keep")))
    assert [n.key for n in fresh.nodes] == [n.key for n in build_plan(parse_spec(_lrr(None))).nodes]
    assert keep.rounds[1].trained.fields == {**fresh.rounds[1].trained.fields, "optimizer_state": "restored"}
    spec = parse_spec(_lrr("keep"))
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(keep.nodes, rt)
    trained = rt.store.load(refs[keep.rounds[0].trained.key])
    mask = rt.store.load(refs[keep.rounds[1].mask.key])["mask"]

    got = rt.store.load(refs[keep.rounds[1].trained.key])["model"]
    kept = _train_from(trained["model"], spec, mask, 0, trained["optimizer"])
    assert all(torch.equal(got[k], v) for k, v in kept.items())
    assert any(not torch.equal(got[k], v) for k, v in _train_from(trained["model"], spec, mask, 0, None).items())
    with pytest.raises(SpecError, match="retrain.optimizer must equal train.optimizer"):
        parse_spec(_lrr("keep") | {"retrain": {"optimizer": "adam", "lr": 1e-3, "epochs": 1}})
