"""Issue 10: augmentation on the device, CIFAR-100, and the fast-training options (bf16,
channels_last, compile, deterministic). Crops and flips are checked on hand-made images;
resume with augmentation is bit-exact; existing keys are pinned."""
from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, tiny_raw, tiny_spec
from pai_core import data
from pai_core.augment import KINDS, PAD, apply, augment_batch, check_kinds, draw, generator_at
from pai_core.data.cifar import CIFAR100_INFO, MEAN_100, STD_100
from pai_core.data.registry import DataBundle, Split
from pai_core.paradigms import build_plan
from pai_core.spec_io import SpecError, load_spec, parse_spec
from pai_core.specs import TrainSpec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.determinism import fast_kernels
from pai_core.training import Callback, epoch_order, train

IMG = torch.arange(16.0).view(1, 1, 4, 4)  # rows [0..3], [4..7], [8..11], [12..15]
F_ = -1.0  # the fill, distinct from every pixel


# ------------------------------------------------------------------ crop and flip by hand


def test_crop_with_padding_one_on_a_hand_made_image():
    # Padded 6×6 with -1; the crop at (top 0, left 2) takes padded rows 0-3, columns 2-5.
    out = apply(IMG, torch.tensor([[0, 2]]), None, pad=1, fill=F_)
    assert torch.equal(out[0, 0], torch.tensor([[F_, F_, F_, F_],
                                                 [1., 2., 3., F_],
                                                 [5., 6., 7., F_],
                                                 [9., 10., 11., F_]]))


def test_flip_alone_and_crop_then_flip():
    flipped = apply(IMG, None, torch.tensor([True]))
    assert torch.equal(flipped[0, 0], torch.tensor([[3., 2., 1., 0.], [7., 6., 5., 4.],
                                                     [11., 10., 9., 8.], [15., 14., 13., 12.]]))
    both = apply(IMG, torch.tensor([[0, 2]]), torch.tensor([True]), pad=1, fill=F_)
    assert torch.equal(both[0, 0], torch.tensor([[F_, F_, F_, F_],
                                                  [F_, 3., 2., 1.],
                                                  [F_, 7., 6., 5.],
                                                  [F_, 11., 10., 9.]]))
    assert torch.equal(apply(IMG, None, torch.tensor([False])), IMG)


def test_default_padding_is_four_pixels():
    # Padded 12×12, the image at rows/columns 4-7: offset (4, 4) is the identity, (5, 3)
    # shifts it up one row and right one column, (8, 0) sees only padding.
    assert PAD == 4
    batch = IMG.expand(3, 1, 4, 4)
    out = apply(batch, torch.tensor([[4, 4], [5, 3], [8, 0]]), torch.tensor([False, False, False]), fill=F_)
    assert torch.equal(out[0], IMG[0])
    assert torch.equal(out[1, 0], torch.tensor([[F_, 4., 5., 6.], [F_, 8., 9., 10.],
                                                 [F_, 12., 13., 14.], [F_, F_, F_, F_]]))
    assert torch.equal(out[2, 0], torch.full((4, 4), F_))


def test_per_channel_fill_and_per_example_draws():
    x = torch.stack([IMG[0, 0], 100 + IMG[0, 0]]).unsqueeze(0).repeat(2, 1, 1, 1)  # 2 examples × 2 channels
    out = apply(x, torch.tensor([[0, 0], [1, 1]]), torch.tensor([False, True]), pad=1, fill=(-1.0, -2.0))
    assert torch.equal(out[0, 0, 0], torch.tensor([-1., -1., -1., -1.]))   # top border, channel 0
    assert torch.equal(out[0, 1, 0], torch.tensor([-2., -2., -2., -2.]))   # top border, channel 1
    assert torch.equal(out[0, 1, 1], torch.tensor([-2., 100., 101., 102.]))
    assert torch.equal(out[1], x[1].flip(-1)), "offset (1, 1) with pad 1 is the identity; then mirrored"
    with pytest.raises(ValueError, match="one per channel"):
        apply(x, torch.tensor([[0, 0], [1, 1]]), None, pad=1, fill=(1.0, 2.0, 3.0))


def test_draws_are_a_pure_function_of_seed_and_iteration():
    offsets, flips = draw(10_000, KINDS, generator_at(3, 10))
    again = draw(10_000, KINDS, generator_at(3, 10))
    assert torch.equal(offsets, again[0]) and torch.equal(flips, again[1])
    assert not torch.equal(offsets, draw(10_000, KINDS, generator_at(3, 11))[0])
    assert not torch.equal(offsets, draw(10_000, KINDS, generator_at(4, 10))[0])
    assert offsets.min() == 0 and offsets.max() == 2 * PAD  # RandomCrop's 0..8 inclusive
    assert 0.47 < flips.float().mean() < 0.53
    assert torch.equal(draw(50, ("crop",), generator_at(3, 10))[0], offsets[:50]), "flip draws come after crops"
    x = torch.randn(6, 3, 8, 8)
    kept = x.clone()
    out = augment_batch(x, ["flip", "crop"], generator_at(0, 5), fill=0.5)
    assert torch.equal(x, kept), "the batch itself is not changed"
    assert torch.equal(out, apply(x, *draw(6, KINDS, generator_at(0, 5)), fill=0.5))
    assert augment_batch(x, (), generator_at(0, 5)) is x


def test_unknown_or_repeated_kinds_are_refused():
    with pytest.raises(ValueError, match=r"data\.augment: unknown kind 'rotate'; allowed: crop, flip"):
        check_kinds(["crop", "rotate"])
    with pytest.raises(ValueError, match=r"data\.augment: each kind at most once"):
        check_kinds(["flip", "flip"])
    assert check_kinds(["flip", "crop"]) == ("crop", "flip")


# ------------------------------------------------------------------ training with augmentation


def cifar_like(n_train: int = 120, seed: int = 0) -> DataBundle:
    """CIFAR-shaped (3×32×32, 10 classes) class prototypes plus noise, normalised-looking."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(10, 3, 32, 32, generator=g)

    def split(n):
        y = torch.arange(n) % 10
        return Split(protos[y] + torch.randn(n, 3, 32, 32, generator=g), y)

    return DataBundle("cifar_like", split(n_train), split(40), split(40), (3, 32, 32), 10)


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


SGD2 = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=2)
AUG = dict(augment=("crop", "flip"), crop_fill=(-1.9, -2.0, -1.7))


class CrashMidEpoch2(Callback):
    def after_backward(self, state):
        if state.it == 5:  # 120 examples / batch 40 = 3 iterations per epoch
            raise KeyboardInterrupt("simulated kill in epoch 2")


def test_resume_with_augmentation_is_bit_exact(tmp_path):
    data_ = cifar_like()
    full = conv_net()
    train(full, data_, SGD2, batch_size=40, order_seed=7, **AUG)
    ckpt = tmp_path / "aug.ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        train(conv_net(), data_, SGD2, batch_size=40, order_seed=7, checkpoint=ckpt, callbacks=[CrashMidEpoch2()],
              **AUG)
    assert torch.load(ckpt, weights_only=True)["iteration"] == 3
    resumed = conv_net(seed=99)  # a new process: the weights come only from the checkpoint
    out = train(resumed, data_, SGD2, batch_size=40, order_seed=7, checkpoint=ckpt, **AUG)
    assert out.iteration == 6 and same(full, resumed)
    # ... and the augmentation was really applied: without it the trajectory differs.
    plain = conv_net()
    train(plain, data_, SGD2, batch_size=40, order_seed=7)
    assert not same(full, plain)


def test_each_step_sees_its_batch_augmented_by_the_draws_of_its_iteration():
    data_ = cifar_like()
    seen = []
    model = conv_net()
    model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()) if m.training else None)
    train(model, data_, SGD2, batch_size=40, order_seed=7, stop_iter=4, **AUG)
    for it in (0, 3):  # iteration 3 is the first of epoch 1
        epoch, pos = divmod(it, 3)
        idx = epoch_order(120, 7, epoch)[pos * 40:(pos + 1) * 40]
        expect = augment_batch(data_.train.x[idx], AUG["augment"], generator_at(7, it), fill=AUG["crop_fill"])
        assert torch.equal(seen[it], expect)


def test_a_training_stage_with_augmentation_runs_and_keys_it(tmp_path):
    spec = tiny_spec(data={"augment": ["flip"]}, prune={"rounds": 1})
    plan = build_plan(spec)
    trains = [n for n in plan.nodes if n.stage == "train"]
    assert trains and all(n.fields["data"]["augment"] == ["flip"] for n in trains)
    assert all("augment" not in n.fields.get("data", {}) for n in plan.nodes if n.stage != "train"), \
        "scoring and evaluation never augment"
    refs = run_plan(plan.nodes, Runtime(Store(tmp_path), "cpu"))
    assert refs[plan.rounds[0].trained.key].info.history[-1]["val_acc"] > 0.3


# ------------------------------------------------------------------ keys


LTH = ROOT / "configs/lth/lenet300_mnist.yaml"
EB = ROOT / "configs/early_bird/conv2_fashion.yaml"


def keys(path, *overrides):
    plan = build_plan(load_spec(path, list(overrides)))
    return {f"{r.name}|{n.role}": n.key for r, nodes in zip(plan.rounds, plan.nodes_by_round()) for n in nodes}


def test_existing_keys_are_unchanged():
    # Computed with the code before issue 10: MNIST-likes get no augmentation and the new
    # train options at their defaults enter no key.
    assert keys(LTH) == {
        "dense|init": "8cc42ad981beb3a24757", "dense|pretrain": "7b675c79ac8bec9a76eb",
        "dense|evaluate": "66935315e63a2a082f22", "round 1|score": "98eecfb1e40c697cc7ed",
        "round 1|mask": "69d98d67b4c09565a055", "round 1|retrain": "edd09c2df5e2bcd146f2",
        "round 1|evaluate": "3aa1ea7b6a5577e58da5", "round 1 reinit|init": "f38ef1e969fabb34529b",
        "round 1 reinit|reinit": "221b8aeabd463059a58c", "round 1 reinit|evaluate": "17b6f33f851f190baf07",
        "round 2|score": "ae60e3ba6a67886332e2", "round 2|mask": "6e2fe7484e6cf1fc91f0",
        "round 2|retrain": "0140c3d702cd92f4d4cd", "round 2|evaluate": "4fe412ae547f754baab1",
        "round 2 reinit|reinit": "eb9ac6c276c8266cf10e", "round 2 reinit|evaluate": "2118dabe20a6c45be6df",
        "round 3|score": "9cd44fb06dd2b9eda9bc", "round 3|mask": "964b98bcf858eafea6e4",
        "round 3|retrain": "3031b355e219a29ff084", "round 3|evaluate": "fd76fb0e8ba1f9b6bc6d",
        "round 3 reinit|reinit": "a2f84b00f77ad5b75503", "round 3 reinit|evaluate": "e17984431385ef727046",
    }
    assert keys(EB) == {
        "dense|init": "4de04befb9356b637326", "dense|pretrain": "da378f719e6a98ca7c50",
        "dense|evaluate": "29adccfb0aa206ea57c4", "early-bird|eb_search": "f671ce611907b0eaa727",
        "early-bird|retrain": "b4dc52c18573fa8bf126", "early-bird|evaluate": "b494cb13a3b28418c7c0",
    }
    explicit = ("train.precision=fp32", "train.channels_last=false", "train.compile=false",
                "train.deterministic=true", "data.augment=[]")
    assert keys(LTH, *explicit) == keys(LTH)


def test_each_new_option_changes_only_the_trainings():
    base = keys(LTH)
    for override in ("train.precision=bf16", "train.channels_last=true", "train.compile=true",
                     "train.deterministic=false", "data.augment=[flip]"):
        changed = {k for k, v in keys(LTH, override).items() if base[k] != v}
        assert "dense|pretrain" in changed and "dense|init" not in changed, override
        assert not any(k.endswith(("|init", "|mask")) and k.startswith("dense") for k in changed)
    assert "precision" in TrainSpec(lr=0.1, epochs=1, precision="bf16").key_fields()
    assert "precision" not in TrainSpec(lr=0.1, epochs=1).key_fields()


def test_cifar_trains_with_crop_and_flip_by_default():
    raw = tiny_raw(model={"name": "conv2"}, data={"dataset": "cifar10", "batch_size": 60})
    spec = parse_spec(raw)
    assert spec.data.augment is None and spec.data.augment_kinds == ("crop", "flip")
    pretrain = build_plan(spec).rounds[0].trained
    assert pretrain.fields["data"]["augment"] == ["crop", "flip"]
    swapped = build_plan(parse_spec(tiny_raw(model={"name": "conv2"},
                                             data={"dataset": "cifar10", "batch_size": 60,
                                                   "augment": ["flip", "crop"]}))).rounds[0].trained
    assert swapped.key == pretrain.key, "the kinds are applied in one fixed order, so their order is not keyed"
    none = build_plan(parse_spec(tiny_raw(model={"name": "conv2"},
                                          data={"dataset": "cifar10", "batch_size": 60, "augment": []})))
    assert "augment" not in none.rounds[0].trained.fields["data"]
    assert parse_spec(tiny_raw()).data.augment_kinds == ()  # synthetic (like MNIST): none


@pytest.mark.parametrize("over, match", [
    ({"data": {"augment": ["rotate"]}}, r"data\.augment\.0: Input should be 'crop' or 'flip' \(got 'rotate'\)"),
    ({"data": {"augment": ["crop", "crop"]}}, r"data\.augment: each kind at most once .*allowed: crop, flip"),
    ({"train": {"precision": "fp16"}}, r"train\.precision: Input should be 'fp32' or 'bf16'"),
    ({"train": {"compile": "maybe"}}, r"train\.compile: Input should be a valid boolean"),
    ({"train": {"channels_last": 2}}, r"train\.channels_last: Input should be a valid boolean"),
    ({"train": {"deterministic": "sometimes"}}, r"train\.deterministic: Input should be a valid boolean"),
])
def test_bad_values_are_refused_naming_the_field(over, match):
    with pytest.raises(SpecError, match=match) as err:
        parse_spec(tiny_raw(**over))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ precision and speed options


def test_fp32_is_exactly_the_plain_sgd_loop():
    """The default path adds nothing to the computation: the same numbers as a hand-written loop."""
    data_, spec = cifar_like(), TrainSpec(lr=0.05, epochs=1)
    trained = conv_net()
    train(trained, data_, spec, batch_size=40, order_seed=1)
    ref = conv_net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for idx in epoch_order(len(data_.train), 1, 0).split(40):
        loss = F.cross_entropy(ref(data_.train.x[idx]), data_.train.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert same(trained, ref)
    relaxed = conv_net()
    train(relaxed, data_, spec.model_copy(update={"deterministic": False}), batch_size=40, order_seed=1)
    assert same(relaxed, ref), "deterministic: false has no effect on CPU"


def test_bf16_trains_on_cpu_and_differs_from_fp32():
    fp32 = conv_net()
    bf16 = conv_net()
    data_ = cifar_like()
    out32 = train(fp32, data_, SGD2, batch_size=40, order_seed=7)
    out16 = train(bf16, data_, SGD2.model_copy(update={"precision": "bf16"}), batch_size=40, order_seed=7)
    assert not same(fp32, bf16)
    assert all(p.dtype == torch.float32 for p in bf16.parameters()), "weights stay fp32"
    w32, w16 = torch.cat([p.flatten() for p in fp32.parameters()]), torch.cat([p.flatten() for p in bf16.parameters()])
    assert torch.isfinite(w16).all() and (w16 - w32).abs().max() < 0.05, "the same trajectory, in lower precision"
    assert abs(out16.history[-1]["train_loss"] - out32.history[-1]["train_loss"]) < 0.05


def test_channels_last_trains_the_same_math_and_restores_the_layout():
    data_ = cifar_like()
    plain, cl = conv_net(), conv_net()
    train(plain, data_, SGD2, batch_size=40, order_seed=7, **AUG)
    train(cl, data_, SGD2.model_copy(update={"channels_last": True}), batch_size=40, order_seed=7, **AUG)
    for (name, a), b in zip(plain.state_dict().items(), cl.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
        assert b.is_contiguous(), f"{name}: stored in the standard layout"


def test_fast_kernels_switch_determinism_off_and_restore_it():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with fast_kernels():
            assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def _compiler_works() -> str:
    """Why torch.compile cannot run here, or '' if it can."""
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "no C++ compiler on this machine (inductor needs one)"
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(2))
    except Exception as exc:  # noqa: BLE001  any failure means: not usable here
        return f"torch.compile is not usable here: {type(exc).__name__}: {exc}"[:300]
    return ""


@pytest.mark.slow
def test_compile_trains_like_eager_and_keeps_plain_state_dict_keys(tmp_path):
    if why := _compiler_works():
        pytest.skip(why)
    data_ = cifar_like()
    eager, compiled = conv_net(), conv_net()
    train(eager, data_, SGD2, batch_size=40, order_seed=7, **AUG)
    spec = SGD2.model_copy(update={"compile": True})
    ckpt = tmp_path / "c.ckpt.pt"
    train(compiled, data_, spec, batch_size=40, order_seed=7, checkpoint=ckpt, stop_iter=4, **AUG)
    assert list(torch.load(ckpt, weights_only=True)["model"]) == list(eager.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    train(compiled, data_, spec, batch_size=40, order_seed=7, checkpoint=ckpt, **AUG)  # resumes from it 3
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name


# ------------------------------------------------------------------ CIFAR-100


def test_cifar100_is_registered_with_its_statistics():
    info = data.dataset_info("cifar100")
    assert info is CIFAR100_INFO
    assert (info.in_shape, info.num_classes, info.train_size, info.default_val_size) == ((3, 32, 32), 100, 50000, 5000)
    assert info.default_augment == ("crop", "flip")
    assert info.crop_fill == pytest.approx(tuple(-m / s for m, s in zip(MEAN_100, STD_100)))
    assert data.dataset_info("mnist").default_augment == () and data.dataset_info("mnist").crop_fill is None
    assert data.dataset_info("cifar10").crop_fill == pytest.approx((-0.4914 / 0.2470, -0.4822 / 0.2435,
                                                                    -0.4465 / 0.2616))


def _fake_cifar100(root, monkeypatch, n_train: int = 40, n_test: int = 20) -> dict:
    """Tiny CIFAR-100 in torchvision's cifar-100-python layout; its MD5s are pointed at the fakes."""
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import calculate_md5

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng, arrays = np.random.default_rng(0), {}
    for name, n in (("train", n_train), ("test", n_test)):
        arrays[name] = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in (np.arange(n) * 7) % 100]
        (folder / name).write_bytes(pickle.dumps({"data": arrays[name], "fine_labels": fine,
                                                  "coarse_labels": [v // 5 for v in fine]}))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    md5 = lambda name: calculate_md5(str(folder / name))  # noqa: E731
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5("train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5("test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5("meta")})
    return arrays


def test_cifar100_loads_fine_labels_from_torchvision_layout(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    arrays = _fake_cifar100(tmp_path, monkeypatch)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive",
                        lambda *a, **k: pytest.fail("files are present; must not download"))
    b = data.load("cifar100", root=tmp_path, val_size=0)
    raw = arrays["train"].reshape(-1, 3, 32, 32)
    mean, std = torch.tensor(MEAN_100).view(1, 3, 1, 1), torch.tensor(STD_100).view(1, 3, 1, 1)
    assert torch.allclose(b.train.x, (torch.from_numpy(raw).float() / 255 - mean) / std, atol=1e-5)
    assert b.train.y.tolist()[:4] == [0, 7, 14, 21] and len(b.test) == 20 and b.num_classes == 100


def test_cifar100_without_files_or_network_is_data_unavailable(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    from urllib.error import URLError

    def offline(*a, **k):
        raise URLError("offline (test)")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(data.DataUnavailable, match=r"CIFAR-100 could not be .*cifar-100-python"):
        data.load("cifar100", root=tmp_path)
