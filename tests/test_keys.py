"""Stage keys: pinned, per stage, and sensitive to exactly what each stage reads."""
from __future__ import annotations

import hashlib

import pytest

from conftest import ROOT
from pai_core.keys import stage_key
from pai_core.paradigms import build_plan
from pai_core.spec_io import load_spec

LTH = ROOT / "configs/lth/lenet300_mnist.yaml"
PAT = ROOT / "configs/pat/lenet300_mnist.yaml"


def roles(path, *overrides):
    """{(round name, role): key} for a config's plan."""
    plan = build_plan(load_spec(path, list(overrides)))
    return {(r.name, n.role): n.key for r, nodes in zip(plan.rounds, plan.nodes_by_round()) for n in nodes}


def test_keys_are_pinned():
    # If this fails, a change altered what some stage is keyed on: every stored artifact of
    # that stage is orphaned. Bump keys.SALTS deliberately and update the pins, or undo it.
    k = roles(LTH)
    assert k[("dense", "init")] == "8cc42ad981beb3a24757"
    assert k[("dense", "pretrain")] == "7b675c79ac8bec9a76eb"
    assert k[("round 1", "score")] == "98eecfb1e40c697cc7ed"
    assert k[("round 1", "mask")] == "69d98d67b4c09565a055"
    assert k[("round 1", "retrain")] == "edd09c2df5e2bcd146f2"
    assert k[("round 3", "evaluate")] == "fd76fb0e8ba1f9b6bc6d"
    assert k[("round 2 reinit", "reinit")] == "eb9ac6c276c8266cf10e"


def test_key_is_sha256_of_canonical_stage_fields_and_upstream():
    text = '{"fields":{"a":1,"b":[1,2]},"salt":1,"stage":"mask","upstream":{"scores":"k1"}}'
    assert stage_key("mask", {"b": [1, 2], "a": 1}, {"scores": "k1"}) == hashlib.sha256(text.encode()).hexdigest()[:20]


def test_lth_and_pat_share_init_and_pretrain():
    lth, pat = roles(LTH), roles(PAT)
    for role in ("init", "pretrain"):
        assert lth[("dense", role)] == pat[("dense", role)]
    assert lth[("round 1", "score")] == pat[("round 1", "score")]  # |w| of the same trained net


def test_changing_finetune_lr_changes_only_finetune_and_evaluate():
    before, after = roles(PAT), roles(PAT, "retrain.lr=0.0001")
    changed = {role for (rnd, role), key in before.items() if after[(rnd, role)] != key}
    assert changed == {"finetune", "evaluate"}
    assert before[("dense", "evaluate")] == after[("dense", "evaluate")]


def test_changing_lth_retrain_lr_keeps_round_one_mask():
    before, after = roles(LTH), roles(LTH, "retrain.optimizer=adam", "retrain.lr=0.001", "retrain.epochs=5")
    assert before[("round 1", "mask")] == after[("round 1", "mask")]
    assert before[("round 1", "retrain")] != after[("round 1", "retrain")]
    assert before[("dense", "pretrain")] == after[("dense", "pretrain")]


def test_seed_changes_everything_and_name_or_device_nothing():
    base = roles(LTH)
    reseeded = roles(LTH, "seed=1")
    assert all(reseeded[k] != v for k, v in base.items())
    assert roles(LTH, "name=other", "device=cpu", "experiment=x") == base


def test_sparsity_sweep_shares_everything_before_the_mask():
    a, b = roles(PAT, "prune.sparsity=0.5"), roles(PAT, "prune.sparsity=0.95")
    for role in ("init", "pretrain", "evaluate"):
        assert a[("dense", role)] == b[("dense", role)]
    assert a[("round 1", "score")] == b[("round 1", "score")]
    assert a[("round 1", "mask")] != b[("round 1", "mask")]


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="allowed: init"):
        stage_key("prune", {}, {})


def test_prune_at_init_shares_the_init_with_lth():
    snip = roles(ROOT / "configs/prune_at_init/snip_lenet300_mnist.yaml")
    assert snip[("dense", "init")] == roles(LTH)[("dense", "init")]
    assert snip[("dense", "pretrain")] == roles(LTH, "train.epochs=15")[("dense", "pretrain")]
    synflow = roles(ROOT / "configs/prune_at_init/synflow_lenet300_mnist.yaml")
    assert synflow[("dense", "pretrain")] == snip[("dense", "pretrain")]
