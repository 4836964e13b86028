"""Nothing lost, nothing trusted blindly: temp files of killed writers, bad checkpoints, edited or
copied metadata, wrong-shaped files and read-only stores are all handled without a traceback."""
from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_spec
from pai_core.data import load
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.specs import TrainSpec
from pai_core.stages import Runtime, run, run_plan
from pai_core.store import _HOST, Store, StoreError, load_checkpoint, save_checkpoint, seal
from pai_core.training import Callback, train

SGD = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, epochs=3, lr_schedule="step", milestones=(2,))


def dead_pid() -> int:
    (child := subprocess.Popen([sys.executable, "-c", "pass"])).wait()
    return child.pid  # reaped: no process has it (reuse within the test is vanishingly unlikely)


def put_blob(store: Store, key: str = "k", **info) -> Path:
    store.put("blob", key, {"x": torch.arange(5.0)}, {"test_acc": 0.5, **info})
    return store.meta_path("blob", key)


def aside(path: Path) -> list[Path]:
    return list(path.parent.glob(f"{path.name}.corrupt-*"))


# ------------------------------------------------------------------ 4: temp files of killed writers
def test_a_writer_killed_mid_write_leaves_a_temp_file_the_next_store_removes(tmp_path):
    target = tmp_path / "blob" / "k.pt"
    code = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path\n"
            "import pai_core.store as s\n"
            "os.replace = lambda *a: os._exit(9)  # killed after fsync, before the rename\n"
            f"s.atomic_write(Path({str(target)!r}), b'x' * 100)\n")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    assert child.wait() == 9
    [tmp] = target.parent.glob(".*.tmp")
    assert tmp.name.startswith(f".k.pt.{child.pid}@{_HOST}."), "the temp file names its writer"
    assert Store(tmp_path).get("blob", "k") is None
    assert not tmp.exists(), "a dead writer's temp file is removed"


def test_only_dead_writers_temp_files_are_removed(tmp_path):
    store = Store(tmp_path)
    put_blob(store)
    folder = tmp_path / "blob"
    dead = folder / f".k.pt.{dead_pid()}@{_HOST}.abc_123.tmp"
    live = folder / f".k.pt.{os.getpid()}@{_HOST}.def456.tmp"
    other_host = folder / f".k.pt.{dead_pid()}@elsewhere.ghi789.tmp"  # its pid means nothing here
    old_style, old_style_stale = folder / ".k.json.x1y2z3.tmp", folder / ".k.pt.q9w8e7.tmp"
    for p in (dead, live, other_host, old_style, old_style_stale):
        p.write_bytes(b"half")
    os.utime(old_style_stale, (time.time() - 3 * 86400,) * 2)
    assert Store(tmp_path).get("blob", "k") is not None
    assert not dead.exists() and not old_style_stale.exists()
    assert live.exists() and other_host.exists() and old_style.exists(), "a live writer's file is never touched"


# ------------------------------------------------------------------ 5: training checkpoints
def fresh():
    return (data := load("synthetic")), build_model("lenet_300_100", data.in_shape, data.num_classes, seed=0)


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


class Crash(Callback):
    def after_backward(self, state):
        if state.it == 45:  # mid epoch 3, after epoch 2's checkpoint
            raise KeyboardInterrupt


@pytest.fixture
def crashed_checkpoint(tmp_path):
    data, full = fresh()
    train(full, data, SGD, batch_size=50, order_seed=1)
    ckpt = tmp_path / "c.ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        train(fresh()[1], data, SGD, batch_size=50, order_seed=1, checkpoint=ckpt, callbacks=[Crash()])
    return data, full, ckpt


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "folder", "other_model", "garbage_dict"])
def test_a_bad_checkpoint_is_set_aside_and_training_restarts(crashed_checkpoint, damage, caplog):
    data, full, ckpt = crashed_checkpoint
    raw = ckpt.read_bytes()
    if damage == "truncate":
        ckpt.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_byte":  # torch.load accepts this silently; the sidecar sha256 does not
        ckpt.write_bytes(raw[:-5000] + bytes([raw[-5000] ^ 0xFF]) + raw[-4999:])
    elif damage == "folder":
        ckpt.unlink()
        ckpt.mkdir()
    else:  # a loadable file that is not this run's checkpoint (no sidecar: as a v1 run wrote it)
        other = {"model": torch.nn.Linear(3, 2).state_dict(), "optimizer": {}, "iteration": 40, "history": []}
        torch.save(other if damage == "other_model" else {"iteration": "x"}, ckpt)
        Path(f"{ckpt}.sha256").unlink()
    _, resumed = fresh()
    with caplog.at_level(logging.WARNING):
        out = train(resumed, data, SGD, batch_size=50, order_seed=1, checkpoint=ckpt)
    assert [r["epoch"] for r in out.history] == [1.0, 2.0, 3.0], "restarted from the beginning"
    assert same_weights(full, resumed), "same result as an uninterrupted run"
    assert aside(ckpt) and "not usable" in caplog.text


def test_a_checkpoint_without_sidecar_still_resumes(crashed_checkpoint):
    """Checkpoints written before the sidecar existed, or a kill between checkpoint and sidecar."""
    data, full, ckpt = crashed_checkpoint
    Path(f"{ckpt}.sha256").unlink()
    _, resumed = fresh()
    out = train(resumed, data, SGD, batch_size=50, order_seed=1, checkpoint=ckpt)
    assert [r["epoch"] for r in out.history] == [1.0, 2.0, 3.0] and same_weights(full, resumed)
    assert not aside(ckpt)


# ------------------------------------------------------------------ 6: metadata is sealed
def edit_acc(meta_path: Path, acc: float) -> None:
    meta = json.loads(meta_path.read_text())
    meta["info"]["test_acc"] = acc
    meta_path.write_text(json.dumps(meta, indent=1))


def test_edited_or_copied_metadata_is_not_trusted(tmp_path):
    store = Store(tmp_path)
    edit_acc(meta_path := put_blob(store), 0.99)
    assert store.get("blob", "k") is None and aside(meta_path)
    put_blob(store, "a")
    put_blob(store, "b", test_acc=0.9)
    for suffix in (".pt", ".json"):  # b's pair over a: its sha256 checks out, its key does not
        (tmp_path / "blob" / f"a{suffix}").write_bytes((tmp_path / "blob" / f"b{suffix}").read_bytes())
    assert store.get("blob", "a") is None
    assert store.get("blob", "b").info.test_acc == 0.9


def test_an_edited_result_is_recomputed_not_reported(tmp_path):
    plan = build_plan(tiny_spec())
    first = run_plan(plan.nodes, Runtime(Store(tmp_path), "cpu"))
    ev = plan.rounds[1].evaluate
    edit_acc(Store(tmp_path).meta_path("evaluate", ev.key), 1.0)
    rt = Runtime(Store(tmp_path), "cpu")
    again = run_plan(plan.nodes, rt)
    assert rt.computed == [f"evaluate/{ev.key}"]
    assert again[ev.key].info.test_acc == first[ev.key].info.test_acc != 1.0


def write_v1(store: Store, name: str, **meta_over) -> Path:
    """An artifact as the previous version wrote it: no `format`, no `meta_sha256`."""
    meta_path = put_blob(store, name)
    meta = {k: v for k, v in json.loads(meta_path.read_text()).items() if k not in ("format", "meta_sha256")}
    meta_path.write_text(json.dumps({**meta, **meta_over}, indent=1))
    return meta_path


def test_v1_artifacts_are_trusted_once_and_sealed(tmp_path):
    store = Store(tmp_path)
    meta_path = write_v1(store, "old")
    assert store.get("blob", "old").info.test_acc == 0.5
    assert "meta_sha256" in json.loads(meta_path.read_text()), "upgraded in place"
    edit_acc(meta_path, 0.99)
    assert store.get("blob", "old") is None, "once sealed, an edit is caught"
    write_v1(store, "named_wrong", key="other")
    assert store.get("blob", "named_wrong") is None, "a v1 file must still name its own key"


# ------------------------------------------------------------------ 7 + fuzz: wrong shapes never raise
GARBAGE = [b"", b"\x00\xff\xfe\x80 binary", b"null", b"3", b'"text"', b"[]", b"{}", b"[" * 100_000,
           b'{"sha256": 5}', b'{"stage": "blob", "key": "k", "sha256": [], "info": "x"}',
           b'{"stage": "blob", "key": "k", "sha256": "%s", "info": []}' % (b"0" * 64),
           b'{"stage": "blob", "key": "k", "format": 2, "meta_sha256": null}', b'{"info": NaN, "size": 1e999}']


@pytest.mark.parametrize("content", GARBAGE, ids=range(len(GARBAGE)))
def test_get_never_raises_for_garbage_metadata(tmp_path, content, caplog):
    store = Store(tmp_path)
    meta_path = put_blob(store)
    meta_path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert store.get("blob", "k") is None
    assert aside(meta_path) and "not usable" in caplog.text
    assert store.put("blob", "k", {"x": 1}) and store.get("blob", "k") is not None


@pytest.mark.parametrize("payload", [b"", b"garbage", None])
def test_get_never_raises_for_a_garbage_or_wrongly_typed_artifact(tmp_path, payload):
    store = Store(tmp_path)
    store.put("train", "k", {"x": 1}, {"arch": {"model": {}, "in_shape": [1], "num_classes": 2}, "iteration": 3})
    assert store.get("train", "k").info.iteration == 3
    if payload is not None:
        store.payload_path("train", "k").write_bytes(payload)
    else:  # sealed, right key and sha256, but not a TrainInfo
        meta_path = store.meta_path("train", "k")
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps(seal({**meta, "info": {"iteration": "three"}})))
    assert store.get("train", "k") is None


@pytest.mark.parametrize("which", ["json", "pt"])
def test_a_folder_in_place_of_a_file_is_set_aside(tmp_path, which, caplog):
    store = Store(tmp_path)
    put_blob(store)
    path = store.meta_path("blob", "k") if which == "json" else store.payload_path("blob", "k")
    path.unlink()
    (path / "inner").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        assert store.get("blob", "k") is None
    assert not path.exists() and aside(path) and "not usable" in caplog.text
    put_blob(store)
    assert store.get("blob", "k") is not None
    store.payload_path("blob", "k2").mkdir()  # no metadata, so get never looks: put must cope
    put_blob(store, "k2")
    assert store.get("blob", "k2") is not None


# ------------------------------------------------------------------ 8: read-only stores
@pytest.fixture
def read_only(monkeypatch):
    """Call to make every write refuse, as on a read-only store. Tests run as root, where chmod
    stops nothing, and a read-only bind mount needs privileges, so the os calls refuse instead."""
    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied (simulated read-only store)")
    real_open, writes = os.open, os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def on():
        for name in ("replace", "rename", "unlink", "remove", "mkdir", "rmdir"):
            monkeypatch.setattr(os, name, refuse)
        monkeypatch.setattr(os, "open", lambda path, flags, *a, **k: refuse() if flags & writes
                            else real_open(path, flags, *a, **k))
    return on


def test_reading_works_on_a_read_only_store(tmp_path, read_only, caplog):
    store = Store(tmp_path)
    put_blob(store, "good")
    write_v1(store, "old")
    bad = put_blob(store, "bad")
    bad.write_bytes(b"[]")
    (tmp := tmp_path / "blob" / f".good.pt.{dead_pid()}@{_HOST}.abc.tmp").write_bytes(b"")
    read_only()
    store = Store(tmp_path)
    assert torch.equal(store.load(store.get("blob", "good"))["x"], torch.arange(5.0))
    assert store.get("blob", "old").info.test_acc == 0.5, "v1 is still read, just not sealed"
    with caplog.at_level(logging.WARNING):
        assert store.get("blob", "bad") is None
    assert bad.exists() and tmp.exists() and "could not be set aside" in caplog.text


def test_a_needed_write_on_a_read_only_store_fails_in_one_line(tmp_path, read_only):
    init = build_plan(tiny_spec()).nodes[0]
    read_only()
    with pytest.raises(StoreError, match="store is read-only") as e:
        Store(tmp_path).put("blob", "k", {"x": 1})
    assert "\n" not in str(e.value)
    with pytest.raises(StoreError, match="store is read-only"):
        run(init, {}, Runtime(Store(tmp_path), "cpu"))  # refused before computing anything
    with pytest.raises(StoreError, match="store is read-only"):
        save_checkpoint(tmp_path / "c.ckpt.pt", {"iteration": 1})


def test_a_bad_checkpoint_on_a_read_only_store_is_skipped(tmp_path, read_only, caplog):
    ckpt = tmp_path / "c.ckpt.pt"
    save_checkpoint(ckpt, {"iteration": 1})
    ckpt.write_bytes(b"truncated")
    read_only()
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(ckpt) is None
    assert ckpt.exists() and "cannot be set aside" in caplog.text


def test_chmod_read_only_store(tmp_path):
    """The real thing where it can be had (not root): a chmod'ed store folder."""
    put_blob(Store(tmp_path), "good")
    put_blob(Store(tmp_path), "bad").write_bytes(b"[]")
    (folder := tmp_path / "blob").chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (see the read_only fixture)")
        assert Store(tmp_path).get("blob", "good") is not None
        assert Store(tmp_path).get("blob", "bad") is None
        with pytest.raises(StoreError, match="store is read-only"):
            Store(tmp_path).put("blob", "new", {"x": 1})
    finally:
        folder.chmod(0o755)
