"""Sparse selection: the mask is learned, every weight stays bit-for-bit what it was."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_raw
from pai_core.plan import build_plan
from pai_core.spec_io import SpecError, parse_spec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store


def spec_for(selection, **train):
    raw = tiny_raw("supermask", train={"optimizer": "adam", "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0,
                                       "epochs": 4, **train})
    raw.pop("prune")
    raw["selection"] = selection
    return parse_spec(raw)


@pytest.mark.parametrize("selection", [
    {"method": "edge_popup", "keep": 0.3},
    {"method": "supermask", "evaluation": "sampled"},
    {"method": "supermask", "evaluation": "expected"},
])
def test_weights_never_change_and_the_mask_learns(tmp_path, selection):
    # Scores behind a sigmoid move slowly: Zhou et al. train them at a far higher rate.
    spec = spec_for(selection, lr=0.01 if selection["method"] == "edge_popup" else 0.1)
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    node = plan.rounds[0].trained
    out = rt.store.load(refs[node.key])
    init = rt.store.load(refs[node.inputs["init"].key])["model"]
    mask = out["mask"]
    for name, w0 in init.items():
        w = out["model"][name]
        if name not in mask:
            assert torch.equal(w, w0), name  # biases: bit for bit
        elif selection["method"] == "edge_popup":  # frozen at the signed Kaiming constant
            assert torch.equal(w, torch.sign(w0) * math.sqrt(2.0 / w0[0].numel()))
            assert int(mask[name].sum()) == round(0.3 * mask[name].numel())
        elif selection["evaluation"] == "sampled":
            assert torch.equal(w, w0)
        else:  # expected: w ⊙ σ(s), a dense net
            assert torch.equal(w, w0 * torch.sigmoid(out["scores"][name]))
    assert not torch.equal(out["scores"]["fc1.weight"], torch.zeros(0))
    ev = refs[plan.rounds[0].evaluate.key].info
    assert ev["test_acc"] > 0.6, "far above chance (0.1) with untrained weights"
    if selection["method"] == "edge_popup":
        assert ev["sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_supermask_spec_rejects_prune_settings():
    raw = tiny_raw("supermask")
    raw["selection"] = {"method": "edge_popup"}
    with pytest.raises(SpecError, match="supermask learns its mask"):
        parse_spec(raw)
