"""The research-scale models (issue 10): parameter counts against their papers, computed by
hand from each architecture; the option-A shortcut on a hand-made tensor; inits; refusals.

Big nets are counted on the meta device (no memory, no time); forwards use small batches or
small sizes of the nets' own params, so this file runs in a few seconds.
"""
from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from pai_core.models import build_model, model_info
from pai_core.masks import apply_mask
from pai_core.models.resnet_cifar import BasicBlock, ZeroPadShortcut, resnet_cifar
from pai_core.paradigms import build_plan
from pai_core.spec_io import SpecError, load_spec
from pai_core.structured import chain, filter_mask, physically_prune

CIFAR = (3, 32, 32)
SNIP = Path(__file__).resolve().parents[1] / "configs/prune_at_init/snip_lenet300_mnist.yaml"
SYNTHETIC = ["data.dataset=synthetic", "data.val_size=200"]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta(name: str, in_shape=CIFAR, num_classes: int = 10, **params) -> nn.Module:
    with torch.device("meta"):
        return model_info(name).construct(in_shape, num_classes, params)


def _spec(*overrides: str):
    return load_spec(SNIP, list(overrides))


def _refused(*overrides: str) -> str:
    with pytest.raises(SpecError) as err:
        _spec(*overrides)
    return str(err.value)


# ---------------------------------------------------------------- CIFAR ResNets (He et al. 2016)

def _resnet_cifar_count(n: int, num_classes: int = 10) -> int:
    """Option A by hand: 3x3 convs (no bias) + 2 BN params per channel, no shortcut params."""
    block = lambda cin, cout: 9 * cin * cout + 9 * cout * cout + 4 * cout  # noqa: E731
    stem = 9 * 3 * 16 + 2 * 16
    stages = n * block(16, 16) + block(16, 32) + (n - 1) * block(32, 32) + block(32, 64) + (n - 1) * block(64, 64)
    return stem + stages + 64 * num_classes + num_classes


B_SHORTCUTS = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)  # two 1x1 conv + BN shortcuts: 2,752


@pytest.mark.parametrize("name, n, paper", [("resnet32", 5, 0.46e6), ("resnet56", 9, 0.85e6),
                                            ("resnet110", 18, 1.7e6), ("resnet20", 3, 0.27e6)])
def test_cifar_resnet_counts_match_he_et_al_table_6(name: str, n: int, paper: float) -> None:
    a = _count(_meta(name, shortcut="A"))
    assert a == _resnet_cifar_count(n)
    assert float(f"{a:.2g}") == paper  # the paper's 2 significant digits
    # Option B adds exactly the two projection shortcuts: 466,906 / 855,770 / 1,730,714 / 272,474.
    assert _count(_meta(name, shortcut="B")) == a + B_SHORTCUTS


def test_new_cifar_resnets_default_to_option_a_and_resnet20_keeps_b() -> None:
    for name in ("resnet32", "resnet56", "resnet110"):
        model = _meta(name, **model_info(name).Params().model_dump())
        assert _count(model) == _resnet_cifar_count({"resnet32": 5, "resnet56": 9, "resnet110": 18}[name])
        assert sum(isinstance(m, ZeroPadShortcut) for m in model.modules()) == 2
    model = _meta("resnet20", **model_info("resnet20").Params().model_dump())
    assert _count(model) == _resnet_cifar_count(3) + B_SHORTCUTS == 272_474
    assert not any(isinstance(m, ZeroPadShortcut) for m in model.modules())


def test_option_a_shortcut_subsamples_and_zero_pads_channels() -> None:
    sc = ZeroPadShortcut(2, 4, stride=2)
    assert list(sc.parameters()) == [] and list(sc.buffers()) == []
    x = torch.arange(32, dtype=torch.float32).reshape(1, 2, 4, 4)  # channel 0: 0..15, channel 1: 16..31
    expected = torch.tensor([[[[0., 2.], [8., 10.]],
                              [[16., 18.], [24., 26.]],
                              [[0., 0.], [0., 0.]],
                              [[0., 0.], [0., 0.]]]])
    assert torch.equal(sc(x), expected)
    assert torch.equal(ZeroPadShortcut(2, 2, stride=1)(x), x)
    with pytest.raises(ValueError, match="cannot shrink 4 to 2"):
        ZeroPadShortcut(4, 2, stride=1)


def test_option_a_block_adds_the_padded_input() -> None:
    """With its convs zeroed, an eval-mode block outputs relu(shortcut(x)): the wiring, not just the module."""
    block = BasicBlock(2, 4, stride=2, shortcut="A").eval()
    for conv in (block.conv1, block.conv2):
        nn.init.zeros_(conv.weight)
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    out = block(x)
    assert out.shape == (3, 4, 3, 3)
    assert torch.equal(out[:, :2], x[:, :, ::2, ::2].relu())
    assert torch.equal(out[:, 2:], torch.zeros(3, 2, 3, 3))


@pytest.mark.parametrize("name", ["resnet32", "resnet56", "resnet110"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnet_forward_on_a_tiny_batch(name: str, shortcut: str) -> None:
    model = build_model(name, CIFAR, 10, seed=0, shortcut=shortcut)
    out = model(torch.randn(2, *CIFAR))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_cifar_resnet_init_is_kaiming_fan_in() -> None:
    model = build_model("resnet32", CIFAR, 10, seed=0)
    w = model.layer2[0].conv1.weight  # 16 -> 32: fan_in 144 (std 0.118), fan_out 288 (0.083)
    assert w.std().item() == pytest.approx((2 / 144) ** 0.5, rel=0.1)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
               for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_cifar_resnet_depth_must_be_6n_plus_2() -> None:
    with pytest.raises(ValueError, match=r"6n\+2 .*got 21"):
        resnet_cifar(21, CIFAR, 10)


# ---------------------------------------------------------------- VGG-19 (GraSP's CIFAR net)

def test_vgg19_count_matches_grasp() -> None:
    config = [64, 64, 128, 128, 256, 256, 256, 256] + [512] * 8
    convs = sum(9 * cin * cout for cin, cout in zip([3, *config], config))  # bias-free
    hand = convs + 2 * sum(config) + 512 * 10 + 10
    model = _meta("vgg19")
    assert _count(model) == hand == 20_035_018  # GraSP's table: 20.0M
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_vgg19_init_is_grasps() -> None:
    model = build_model("vgg19", CIFAR, 10, seed=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].weight.std().item() == pytest.approx((2 / (9 * 64)) ** 0.5, rel=0.1)  # fan_out; fan_in: 0.27
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.equal(model.fc.bias, torch.zeros(10))


def test_vgg19_is_chain_shaped_so_filters_can_be_removed() -> None:
    assert model_info("vgg19").batch_norm is True
    model = build_model("vgg19", CIFAR, 10, seed=0, width=0.125).eval()
    for m in model.modules():  # non-trivial statistics, so a leaking channel would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.bias.data.uniform_(-1, 1)
    g = torch.Generator().manual_seed(0)
    keep = {n: torch.rand(layer.weight.shape[0], generator=g) > 0.5 for n, layer in chain(model)[:-1]}
    mask = filter_mask(model, keep)
    masked = copy.deepcopy(model)
    apply_mask(masked, mask)
    small = physically_prune(model, mask).eval()
    x = torch.randn(4, *CIFAR, generator=g)
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
    assert [layer.weight.shape[0] for _, layer in chain(small)[:-1]] == [int(k.sum()) for k in keep.values()]


# ---------------------------------------------------------------- Wide ResNets

def _wrn_count(depth: int, k: int, num_classes: int = 10) -> int:
    n = (depth - 4) // 6
    def block(cin: int, cout: int) -> int:  # BN, conv, BN, conv, 1x1 shortcut where the width changes
        return 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout + (cin * cout if cin != cout else 0)

    total, cin = 9 * 3 * 16, 16
    for width in (16 * k, 32 * k, 64 * k):
        total += block(cin, width) + (n - 1) * block(width, width)
        cin = width
    return total + 2 * cin + cin * num_classes + num_classes


@pytest.mark.parametrize("depth, k, paper", [(28, 10, "36.5"), (16, 8, "11.0")])
def test_wrn_counts_match_the_paper(depth: int, k: int, paper: str) -> None:
    n = _count(_meta("wrn", depth=depth, widen=k))
    assert n == _wrn_count(depth, k)
    assert f"{n / 1e6:.1f}" == paper  # millions, as the paper's tables


def test_wrn_default_is_wrn_28_10_without_dropout() -> None:
    params = model_info("wrn").Params().model_dump()
    assert params == {"depth": 28, "widen": 10, "dropout": 0.0, "weight_init": "model", "bn_init": "model",
                      "bias_init": "model"}


def test_wrn_forward_shortcuts_dropout_and_init() -> None:
    model = build_model("wrn", CIFAR, 10, seed=0, depth=10, widen=4)
    x = torch.randn(2, *CIFAR)
    # Dropout adds no parameters and draws nothing at init: same weights, same eval outputs.
    drop = build_model("wrn", CIFAR, 10, seed=0, depth=10, widen=4, dropout=0.3)
    assert sum(isinstance(m, nn.Dropout) for m in drop.modules()) == 3
    torch.testing.assert_close(drop.eval()(x), model.eval()(x))
    assert model.train()(x).shape == (2, 10)
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules()) == 3
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    w = model.layer1[0].conv1.weight  # 16 -> 64: fan_out 576 (std 0.059), fan_in 144 (0.118)
    assert w.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.1)
    assert model.fc.weight.abs().max().item() <= 256 ** -0.5 and torch.equal(model.fc.bias, torch.zeros(10))
    # k = 1: stage 1 keeps 16 channels, so its first block has an identity shortcut.
    thin = build_model("wrn", CIFAR, 10, seed=0, depth=10, widen=1)
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in thin.modules()) == 2


# ---------------------------------------------------------------- torchvision's ResNet-18 / 50

@pytest.mark.parametrize("name, count", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_imagenet_resnet_counts_match_torchvision(name: str, count: int) -> None:
    assert _count(_meta(name, (3, 224, 224), 1000)) == count


def test_imagenet_resnet_is_torchvisions_definition_and_init() -> None:
    from torchvision.models import resnet18

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(3)
        reference = resnet18(weights=None, num_classes=10).state_dict()
    ours = build_model("resnet18", CIFAR, 10, seed=3).state_dict()
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    gray = build_model("resnet18", (1, 28, 28), 10, seed=3)
    assert gray.conv1.weight.shape == (64, 1, 7, 7)
    assert gray.conv1.weight.std().item() == pytest.approx((2 / (49 * 64)) ** 0.5, rel=0.1)  # fan_out
    assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_imagenet_resnet_refuses_inputs_it_cannot_downsample() -> None:
    info = model_info("resnet50")
    assert info.input_problem((3, 17, 17), 10, {}) is None
    assert "at least 17x17" in info.input_problem((3, 16, 64), 10, {})
    assert "resnet18 needs inputs of at least 17x17" in _refused("model.name=resnet18", *SYNTHETIC)


# ---------------------------------------------------------------- registry and specs

@pytest.mark.parametrize("name", ["resnet32", "resnet56", "resnet110", "vgg19", "wrn", "resnet18", "resnet50"])
def test_registration_flags(name: str) -> None:
    info = model_info(name)
    assert info.batch_norm is True
    assert info.has_batch_norm(info.Params().model_dump())


@pytest.mark.parametrize("overrides, message", [
    (["model.name=wrn", "model.depth=27"],
     "model.depth: must be 6n+4 (10, 16, 22, 28, 34, 40, ...), got 27 for wrn; allowed: name, depth, widen, dropout"),
    (["model.name=wrn", "model.dropout=1"], "model.dropout: Input should be less than 1 for wrn"),
    (["model.name=wrn", "model.width=2"], "model.width: unknown field for wrn; allowed: name, depth, widen, dropout"),
    (["model.name=resnet32", "model.shortcut=C"],
     "model.shortcut: Input should be 'A' or 'B' for resnet32; allowed: name, width, shortcut"),
    (["model.name=resnet50", "model.width=0.5"], "model.width: unknown field for resnet50; allowed: name"),
])
def test_bad_model_params_are_refused_by_field(overrides: list[str], message: str) -> None:
    assert message in _refused(*overrides)


def test_resnet32_prune_at_init_spec_on_synthetic_validates() -> None:
    spec = _spec("model.name=resnet32", *SYNTHETIC)
    init = build_plan(spec).rounds[0].trained.inputs["start"]
    assert init.stage == "init" and init.fields["model"] == {"name": "resnet32"}  # shortcut A is the default
    assert init.fields["in_shape"] == [1, 16, 16]
    b = build_plan(_spec("model.name=resnet32", "model.shortcut=B", *SYNTHETIC)).rounds[0].trained.inputs["start"]
    assert b.fields["model"] == {"name": "resnet32", "shortcut": "B"} and b.key != init.key


# Computed with git HEAD's code, before these models were added:
# a spec that names none of the new options keeps its stage keys, so stored artifacts stay valid.
OLD_KEYS = {
    ("model.name=resnet20",): ["2a966bcea3232f683d59", "9cc62ba56c52b639c660", "8cc5c5097f4d9a7b727c",
                               "4294463f7f2ed1203f21", "fbc3e491f0ea67d19ed4", "9ee298650fe659b3dfe9",
                               "40e07896d3577fcb552a"],
    ("model.name=resnet20", "model.width=0.5"): ["cacebfca775ad8c40159"],
    ("model.name=vgg16",): ["8807ddae1bbda6e4e380"],
    ("model.name=vgg11",): ["d70e3354e829ec906343"],
}


@pytest.mark.parametrize("overrides", list(OLD_KEYS), ids=lambda o: " ".join(o))
def test_existing_specs_keep_their_stage_keys(overrides: tuple[str, ...]) -> None:
    keys = [n.key for n in build_plan(_spec(*overrides, *SYNTHETIC)).nodes]
    assert keys[:len(OLD_KEYS[overrides])] == OLD_KEYS[overrides]
    # resnet20's default is shortcut B: naming it leaves the key alone.
    if overrides == ("model.name=resnet20",):
        assert build_plan(_spec(*overrides, "model.shortcut=B", *SYNTHETIC)).nodes[0].key == keys[0]


# sha256 (first 16 hex) of every state-dict entry's name, shape and float32 bytes at seed 0 on
# CIFAR, computed before the change: the edited files still build the same weights for these.
OLD_WEIGHTS = {("resnet20", ()): "c0b4e94edcf751b2", ("resnet20", (("width", 0.5),)): "89ac241f5a938831",
               ("vgg16", ()): "3080d17414a8baac", ("vgg11", ()): "c9c2d6e944363ed4"}


@pytest.mark.parametrize("name, params", list(OLD_WEIGHTS), ids=lambda v: re.sub(r"\W", "", str(v)))
def test_existing_models_build_the_same_weights(name: str, params: tuple) -> None:
    h = hashlib.sha256()
    for k, v in build_model(name, CIFAR, 10, seed=0, **dict(params)).state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.float().numpy().tobytes())
    assert h.hexdigest()[:16] == OLD_WEIGHTS[name, params]
