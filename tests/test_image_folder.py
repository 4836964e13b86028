"""image_folder: ImageNet-style folders streamed from disk by DataLoader workers, on a
generated folder of small JPEGs. Classes, the held-out split, the transforms, determinism
(the same iteration gives the same batch whatever the workers; a resumed training is the
uninterrupted one bit for bit), keys that name the data and not its place, a spec run end
to end, refusals naming data.root, and the keys of existing configs unchanged."""
from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, tiny_spec
from pai_core.data import image_folder as imf
from pai_core.data import image_transforms as imt
from pai_core.data.registry import DataUnavailable, split_indices
from pai_core.data.stream import IterationSampler, example_seed, train_batches
from pai_core.executor import run_specs
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.spec_io import SpecError, load_spec, parse_spec
from pai_core.specs import TrainSpec
from pai_core.store import Store
from pai_core.training import epoch_order, train

CLASSES = ("cat", "dog", "eel")
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))
PER_CLASS = {"train": 8, "val": 4}


def make_folder(root: Path, per_class: dict[str, int] = PER_CLASS, size: tuple[int, int] = (40, 40)) -> Path:
    """3 classes of noisy single-colour 40×40 JPEGs: learnable, and every file different."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = np.clip(np.array(COLOURS[c]) + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255)
                Image.fromarray(a.astype(np.uint8)).save(d / f"{name}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(autouse=True)
def no_known_folders(monkeypatch):
    """Validation records folders in PAI_IMAGE_FOLDERS; each test starts without them."""
    monkeypatch.setenv(imf.FOLDERS_ENV, "")


@pytest.fixture
def one_thread():
    """Tiny nets train faster on one intra-op thread (on a busy 2-core machine, 15 times);
    both sides of every comparison run under it. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "tiny-folder")


def raw_spec(root: Path, flow: str = "prune_at_init", **data) -> dict:
    return {
        "flow": flow, "seed": 0, "device": "cpu", "name": "folder",
        "model": {"name": "lenet5"},
        "data": {"dataset": "image_folder", "root": str(root), "image_size": 32, "batch_size": 4, "val_size": 4,
                 **data},
        "train": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "epochs": 1},
        "prune": {"criterion": "snip", "schedule": "one_shot", "sparsity": 0.5},
    }


def keys(spec) -> dict[tuple[str, str], str]:
    plan = build_plan(spec)
    return {(r.name, n.role): n.key for r, nodes in zip(plan.rounds, plan.nodes_by_round()) for n in nodes}


# ---------------------------------------------------------------- listing and splits

def test_classes_sizes_and_a_held_out_val_disjoint_from_train(folder):
    index = imf.scan(folder)
    assert index.classes == CLASSES  # sorted folder names of train/
    assert len(index.train_files) == 24 and len(index.test_files) == 12
    for files, labels in ((index.train_files, index.train_labels), (index.test_files, index.test_labels)):
        assert [CLASSES[c] for c in labels] == [f.decode().split("/")[0] for f in files]
    spec = parse_spec(raw_spec(folder))
    assert spec.data.info.in_shape == (3, 32, 32) and spec.data.info.num_classes == 3
    assert spec.data.info.train_size == 24 and spec.data.info.default_val_size == 2  # a tenth of train
    assert spec.data.iterations_per_epoch == math.ceil(20 / 4)

    b = imf.bundle(index, image_size=32, val_size=4, split_seed=0)
    train_files = set(b.train.dataset.files.tolist())
    val_files = set(b.val.dataset.files.tolist())
    assert (len(b.train), len(b.val), len(b.test)) == (20, 4, 12)
    assert not train_files & val_files and train_files | val_files == set(index.train_files.tolist())
    _, val_idx = split_indices(24, 4, 0)  # the same rule as every in-memory dataset
    assert val_files == set(index.train_files[val_idx.numpy()].tolist())
    other = imf.bundle(index, image_size=32, val_size=4, split_seed=1)
    assert set(other.val.dataset.files.tolist()) != val_files


def test_tiny_imagenet_val_layout(tmp_path):
    """Tiny-ImageNet's val/images/ + val_annotations.txt is read as it is unpacked."""
    root = make_folder(tmp_path / "tiny-imagenet-200", {"train": 2})
    (root / "val" / "images").mkdir(parents=True)
    for i, c in enumerate(("eel", "cat", "eel")):
        Image.new("RGB", (64, 64), COLOURS[0]).save(root / "val" / "images" / f"val_{i}.JPEG")
    (root / "val" / imf.TINY_ANNOTATIONS).write_text(
        "val_0.JPEG\teel\t0\t0\t62\t62\nval_1.JPEG\tcat\t1\t1\t60\t60\nval_2.JPEG\teel\t0\t0\t9\t9\n")
    index = imf.scan(root)
    assert index.test_files.tolist() == [b"images/val_0.JPEG", b"images/val_1.JPEG", b"images/val_2.JPEG"]
    assert index.test_labels.tolist() == [2, 0, 2]


# ---------------------------------------------------------------- transforms

def test_crop_boxes_follow_random_resized_crop():
    """Area 8-100 % of the image and aspect 3/4-4/3 (up to rounding to whole pixels), inside
    the image; the same seed gives the same box."""
    for seed in range(300):
        left, top, w, h = imt.crop_box(40, 30, random.Random(seed))
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 30
        assert 0.08 * 1200 * 0.8 <= w * h <= 1200
        assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
        assert imt.crop_box(40, 30, random.Random(seed)) == (left, top, w, h)


def test_crop_box_falls_back_to_the_centre_clamped_to_the_aspect_range():
    """A 400×10 strip admits no crop of 8 % of its area at aspect <= 4/3: the centre crop
    10 high and round(10 · 4/3) = 13 wide, at left (400 - 13) // 2 = 193."""
    assert imt.crop_box(400, 10, random.Random(0)) == (193, 0, 13, 10)
    assert imt.crop_box(10, 400, random.Random(0)) == (0, 193, 10, 13)  # 10 / (3/4) = 13.3 -> 13


def test_crop_ranges_are_the_specs():
    """open_lth's ImageNet ranges, scale 0.1-1 and aspect 0.8-1.25; and a degenerate range, exactly
    half the area at aspect 1: round(sqrt(800)) = 28 pixels square, wherever it lands."""
    lth = ((0.1, 1.0), (0.8, 1.25))
    for seed in range(300):
        left, top, w, h = imt.crop_box(40, 30, random.Random(seed), lth)
        assert 0.1 * 1200 * 0.8 <= w * h <= 1200 and 0.8 * 0.8 <= w / h <= 1.25 * 1.25
        assert imt.crop_box(40, 40, random.Random(seed), ((0.5, 0.5), (1.0, 1.0)))[2:] == (28, 28)


def test_crop_ranges_reach_the_training_loader_and_its_key_alone(folder, tmp_path):
    from pai_core.stages import Runtime
    from pai_core.stages.common import bundle_for
    from pai_core.store import Store

    spec = parse_spec(raw_spec(folder, crop_scale=[0.1, 1.0], crop_ratio=[0.8, 1.25]))
    plan = build_plan(spec)
    fields = plan.rounds[0].trained.fields["data"]
    assert fields["crop_scale"] == [0.1, 1.0] and fields["crop_ratio"] == [0.8, 1.25]
    data = bundle_for(fields, Runtime(Store(tmp_path), "cpu"))
    assert data.train.dataset.crop == ((0.1, 1.0), (0.8, 1.25)) and data.train.dataset.train
    plain = keys(parse_spec(raw_spec(folder)))
    cropped = keys(spec)
    assert cropped[("dense", "init")] == plain[("dense", "init")]
    assert cropped[("dense", "pretrain")] != plain[("dense", "pretrain")]
    stated = parse_spec(raw_spec(folder, crop_scale=[0.08, 1.0])).data.crop_scale
    assert stated == (0.08, 1.0)  # torchvision's, stated: a key of its own, like any stated field


@pytest.mark.parametrize("data, message", [
    ({"crop_scale": [0.5, 0.2]}, r"data\.crop_scale: .*0 < lo <= hi <= 1 \(got \[0\.5, 0\.2\]\)"),
    ({"crop_ratio": [0.0, 1.0]}, r"data\.crop_ratio: .*0 < lo <= hi <= 100"),
])
def test_bad_crop_ranges_are_refused_by_name(folder, data, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(raw_spec(folder, **data))


def test_crop_ranges_are_refused_for_in_memory_datasets():
    from conftest import tiny_raw
    with pytest.raises(SpecError, match=r"data\.crop_scale: only dataset image_folder reads it .*allowed: unset"):
        parse_spec(tiny_raw(data={"crop_scale": [0.1, 1.0]}))


def test_transform_shapes_and_normalisation(folder):
    img = Image.open(next((folder / "train" / "cat").iterdir())).convert("RGB")
    assert imt.to_uint8(imt.train_image(img, 32, seed=5)).shape == (3, 32, 32)
    assert imt.to_uint8(imt.eval_image(img, 24)).shape == (3, 24, 24)
    assert torch.equal(imt.to_uint8(imt.train_image(img, 32, 5)), imt.to_uint8(imt.train_image(img, 32, 5)))
    # eval of a 40×30 image at 16: shorter side to round(16 · 256/224) = 18, so 24×18, centre 16×16
    grad = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (30, 1))[..., None].repeat(3, 2))
    out = imt.eval_image(grad, 16)
    assert out.size == (16, 16)
    # ToTensor + Normalize by hand: (v / 255 - mean) / std per channel
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    expect = [(v / 255 - m) / s for v, m, s in zip((0, 128, 255), imt.MEAN, imt.STD)]
    assert torch.allclose(imt.normalize(x)[1, :, 1, 1], torch.tensor(expect), atol=1e-6)


def test_flip_is_drawn_with_probability_one_half(folder):
    """A mirrored crop of a left-right gradient runs right to left."""
    ramp = Image.fromarray(np.tile(np.arange(0, 240, 6, dtype=np.uint8), (40, 1))[..., None].repeat(3, 2))
    flips = [int(imt.to_uint8(imt.train_image(ramp, 16, s))[0, 8, 0]) > int(imt.to_uint8(imt.train_image(
        ramp, 16, s))[0, 8, 15]) for s in range(200)]
    assert 70 <= sum(flips) <= 130


# ---------------------------------------------------------------- determinism

def test_the_same_iteration_gives_the_same_batch(folder):
    index = imf.scan(folder)
    b0 = imf.bundle(index, image_size=32, val_size=4, split_seed=0)
    b2 = imf.bundle(index, image_size=32, val_size=4, split_seed=0, workers=2)
    ipe = 5  # 20 examples, batches of 4
    rng = torch.get_rng_state()
    whole = list(train_batches(b0, 0, 2 * ipe, 4, 7))
    assert torch.equal(torch.get_rng_state(), rng), "streaming drew from the global RNG"
    again = list(train_batches(b2, 0, 2 * ipe, 4, 7))
    resumed = list(train_batches(b0, 6, 8, 4, 7))  # iterations 6 and 7 on their own
    for i, (x, y) in enumerate(whole):
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
        assert torch.equal(x, again[i][0]) and torch.equal(y, again[i][1]), f"iteration {i}: workers changed it"
        epoch, pos = divmod(i, ipe)
        rows = epoch_order(20, 7, epoch)[pos * 4:(pos + 1) * 4]
        assert torch.equal(y, torch.from_numpy(b0.train.dataset.labels)[rows])
    assert torch.equal(resumed[0][0], whole[6][0]) and torch.equal(resumed[1][0], whole[7][0])
    assert not torch.equal(whole[0][0], whole[ipe][0])  # a new epoch: new order, new crops
    sampler = IterationSampler(20, 4, 7, start=ipe + 1, stop=ipe + 2)
    assert [s for _, s in next(iter(sampler))] == [example_seed(7, 1, j) for j in range(4, 8)]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_training_equals_the_uninterrupted_one(folder, workers, one_thread):
    index = imf.scan(folder)
    data = imf.bundle(index, image_size=32, val_size=4, split_seed=0, workers=workers)
    spec = TrainSpec(optimizer="sgd", lr=0.02, momentum=0.9, epochs=2)

    def net():
        return build_model("lenet5", (3, 32, 32), 3, seed=0)

    full = net()
    out = train(full, data, spec, batch_size=4, order_seed=1)
    part = net()
    first = train(part, data, spec, batch_size=4, order_seed=1, stop_iter=7)  # mid epoch 2
    train(part, data, spec, batch_size=4, order_seed=1, start_iter=7, optimizer_state=first.optimizer_state)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), part.state_dict().values()))
    assert [r["iteration"] for r in out.history] == [5, 10]
    if workers:  # and the workers changed nothing: the same weights as in one process
        alone = net()
        train(alone, imf.bundle(index, image_size=32, val_size=4, split_seed=0), spec, batch_size=4, order_seed=1)
        assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), alone.state_dict().values()))


# ---------------------------------------------------------------- keys and a run

def test_keys_name_the_data_not_its_place(folder, tmp_path):
    spec = parse_spec(raw_spec(folder))
    data = build_plan(spec).rounds[-1].evaluate.fields["data"]
    assert data == {"dataset": "image_folder", "root": "tiny-folder", "files": imf.scan(folder).fingerprint,
                    "image_size": 32, "val_size": 4, "split_seed": 0}
    elsewhere = tmp_path / "copy" / "tiny-folder"
    shutil.copytree(folder, elsewhere)
    assert keys(parse_spec(raw_spec(elsewhere))) == keys(spec), "the same files elsewhere share every key"
    fewer = tmp_path / "fewer" / "tiny-folder"  # same name, one file less: other data
    shutil.copytree(folder, fewer)
    (fewer / "train" / "cat" / "cat_0.JPEG").unlink()
    assert keys(parse_spec(raw_spec(fewer)))[("dense", "init")] == keys(spec)[("dense", "init")]
    assert keys(parse_spec(raw_spec(fewer)))[("dense", "pretrain")] != keys(spec)[("dense", "pretrain")]
    k40 = keys(parse_spec(raw_spec(folder, image_size=40)))
    assert k40[("dense", "init")] != keys(spec)[("dense", "init")]  # another input shape, another net


def test_a_prune_at_init_spec_runs_end_to_end_and_a_copy_elsewhere_reuses_it(folder, tmp_path, monkeypatch,
                                                                            one_thread):
    monkeypatch.setenv("PAI_DATA_WORKERS", "0")
    spec = parse_spec(raw_spec(folder))
    store = Store(tmp_path / "store")
    out = run_specs([spec], store)
    assert not out.errors and out.computed == len(build_plan(spec).nodes)
    for rnd in build_plan(spec).rounds:
        info = store.get("evaluate", rnd.evaluate.key).info
        assert 0 <= info.test_acc <= 1 and math.isfinite(info.test_loss)
    sparse = store.get("evaluate", build_plan(spec).rounds[-1].evaluate.key).info
    assert abs(sparse.sparsity - 0.5) < 0.01

    # another machine's copy under PAI_DATA, found by name and fingerprint: nothing recomputed
    other = tmp_path / "other-machine"
    shutil.copytree(folder, other / "tiny-folder")
    monkeypatch.setenv("PAI_DATA", str(other))
    monkeypatch.setenv(imf.FOLDERS_ENV, "")  # forget the first folder: only PAI_DATA/<name> is left
    again = run_specs([parse_spec(raw_spec("tiny-folder"))], store)
    assert again.computed == 0 and not again.errors
    assert imf.locate("tiny-folder", imf.scan(folder).fingerprint).root == (other / "tiny-folder").resolve()


def test_a_stage_refuses_a_folder_with_other_files(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("PAI_DATA", str(tmp_path))
    make_folder(tmp_path / "tiny-folder", {"train": 3, "val": 1})
    with pytest.raises(DataUnavailable, match="hold other files"):
        imf.locate("tiny-folder", imf.scan(folder).fingerprint)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("case, field, match", [
    ("missing", "data.root", "is not a folder"),
    ("no_val", "data.root", "has no val/ folder"),
    ("empty_train", "data.root", "has no class folders"),
    ("empty_class", "data.root", "holds no images"),
    ("unset", "data.root", "image_folder needs the folder"),
    ("augment", "data.augment", "loader workers"),
    ("mnist_root", "data.root", "only dataset image_folder reads it"),
    ("mnist_size", "data.image_size", "only dataset image_folder reads it"),
    ("big_val", "data.val_size", "must be < 24"),
])
def test_bad_roots_are_refused_before_compute_naming_the_field(folder, tmp_path, case, field, match):
    raw = raw_spec(folder)
    bad = tmp_path / "bad"
    if case == "missing":
        raw["data"]["root"] = str(tmp_path / "nowhere")
    elif case == "no_val":
        (bad / "train" / "a").mkdir(parents=True)
        raw["data"]["root"] = str(bad)
    elif case == "empty_train":
        (bad / "train").mkdir(parents=True)
        (bad / "val").mkdir()
        raw["data"]["root"] = str(bad)
    elif case == "empty_class":
        make_folder(bad, {"train": 1, "val": 1})
        (bad / "train" / "zebra").mkdir()
        (bad / "train" / "zebra" / "notes.txt").write_text("not an image")
        raw["data"]["root"] = str(bad)
    elif case == "unset":
        del raw["data"]["root"]
    elif case == "augment":
        raw["data"]["augment"] = ["crop"]
    elif case == "big_val":
        raw["data"]["val_size"] = 24
    else:
        raw = tiny_spec("prune_at_init").model_dump(mode="json")
        raw["data"]["root" if case == "mnist_root" else "image_size"] = str(folder) if case == "mnist_root" else 32
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    msg = str(e.value)
    assert msg.split(": ", 1)[0] == field and match in msg and "\n" not in msg, msg


def test_an_unset_augment_is_empty_for_image_folder(folder):
    spec = parse_spec(raw_spec(folder))
    assert spec.data.augment_kinds == ()
    assert "augment" not in build_plan(spec).rounds[0].trained.fields["data"]


# ---------------------------------------------------------------- nothing else moved

def digest(spec) -> str:
    """Every (round, role, key) of the plan, hashed."""
    plan = build_plan(spec)
    rows = sorted((r.name, n.role, n.key) for r, nodes in zip(plan.rounds, plan.nodes_by_round()) for n in nodes)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


@pytest.mark.parametrize("config, overrides, pinned", [
    ("lth/lenet300_mnist.yaml", [], "53487ec21226536a"),
    ("pat/lenet300_mnist.yaml", [], "dde8e5509bd50189"),
    ("prune_at_init/snip_lenet300_mnist.yaml", [], "a3587de78bb632f1"),
    ("early_bird/conv2_fashion.yaml", [], "b825f7c05178b671"),
    ("supermask/edge_popup_lenet300_mnist.yaml", [], "b40e3fd8c9576c2b"),
    ("lth/lenet300_mnist.yaml", ["data.dataset=cifar10", "model.name=conv2", "data.val_size=5000"],
     "600e3d64887cb090"),  # CIFAR: augmented training
    ("prune_at_init/snip_lenet300_mnist.yaml", ["data.dataset=cifar10", "model.name=vgg11"], "f1c8f2c66bc4313f"),
])
def test_existing_configs_keep_their_keys(config, overrides, pinned):
    """Computed before image_folder existed: the in-memory datasets' keys did not move."""
    assert digest(load_spec(ROOT / "configs" / config, overrides)) == pinned
