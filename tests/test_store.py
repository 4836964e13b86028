"""The artifact store: atomic, verified on reuse, and a corrupt artifact is recomputed."""
from __future__ import annotations

import torch
import pytest

from conftest import tiny_spec
from pai_core.paradigms import build_plan
from pai_core.stages import Runtime, run_plan
from pai_core.store import CorruptArtifact, Store


def test_roundtrip_and_metadata(tmp_path):
    store = Store(tmp_path)
    ref = store.put("blob", "k1", {"model": {"w": torch.arange(4.0)}}, {"iteration": 0})
    again = store.get("blob", "k1")
    assert again.sha256 == ref.sha256 and again.info.iteration == 0 and not again.computed
    assert torch.equal(store.load(again)["model"]["w"], torch.arange(4.0))
    assert not list(tmp_path.rglob("*.tmp")), "no temp file may be left behind"


def test_flipped_byte_is_detected_and_set_aside(tmp_path):
    store = Store(tmp_path)
    store.put("blob", "k", {"x": torch.ones(100)})
    path = store.payload_path("blob", "k")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert Store(tmp_path).get("blob", "k") is None
    assert not path.exists() and list(path.parent.glob("k.pt.corrupt-*"))


def test_load_refuses_bytes_that_changed_after_get(tmp_path):
    store = Store(tmp_path)
    ref = store.put("blob", "k", {"x": torch.ones(10)})
    store.payload_path("blob", "k").write_bytes(b"garbage")
    with pytest.raises(CorruptArtifact):
        store.load(ref)


def test_missing_payload_or_metadata_means_absent(tmp_path):
    store = Store(tmp_path)
    store.put("blob", "a", {"m": 1})
    store.payload_path("blob", "a").unlink()
    assert store.get("blob", "a") is None
    store.put("blob", "b", {"m": 1})
    store.meta_path("blob", "b").unlink()
    assert store.get("blob", "b") is None


def test_failed_write_keeps_the_old_artifact(tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.put("blob", "k", {"v": torch.zeros(3)})
    monkeypatch.setattr("pai_core.store.os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        store.put("blob", "k", {"v": torch.ones(3)})
    monkeypatch.undo()
    assert torch.equal(store.load(store.get("blob", "k"))["v"], torch.zeros(3))
    assert not list(tmp_path.rglob("*.tmp"))


def test_corrupt_stage_output_is_recomputed_and_nothing_else(tmp_path):
    spec = tiny_spec()
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    first = run_plan(plan.nodes, rt)
    assert len(rt.computed) == len(plan.nodes)

    mask_node = plan.rounds[1].mask
    path = rt.store.payload_path("mask", mask_node.key)
    path.write_bytes(path.read_bytes()[:-7] + b"corrupt")
    rt2 = Runtime(Store(tmp_path), "cpu")
    second = run_plan(plan.nodes, rt2)
    assert rt2.computed == [f"mask/{mask_node.key}"]
    assert second[mask_node.key].sha256 == first[mask_node.key].sha256  # deterministic recompute

    rt3 = Runtime(Store(tmp_path), "cpu")
    run_plan(plan.nodes, rt3)
    assert rt3.computed == [], "a finished plan computes nothing"
