"""`prune.layer_density`: per-layer (per-family) densities for one layerwise round, the rates a
sensitivity analysis picks (Li et al. 2017's ResNet-56-pruned-B)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_spec
from pai_core import structured
from pai_core.masks import dense_mask
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.selection import select
from pai_core.spec_io import SpecError
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store

ONE_SHOT = {"schedule": "one_shot", "sparsity": 0.9, "rate": None, "rounds": 1, "scope": "layerwise"}


def test_named_layers_keep_their_own_density_and_the_rest_the_specs():
    gen = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (10, 10), "b.weight": (8, 5), "c.weight": (3, 8)}
    scores = {n: torch.rand(s, generator=gen) for n, s in shapes.items()}
    dense = {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
    mask = select(scores, dense, 0.25, "layerwise", 0.0, {"a.*": 0.5, "c.weight": 1.0})
    assert {n: int(m.sum()) for n, m in mask.items()} == {"a.weight": 50, "b.weight": 10, "c.weight": 24}
    top_a = scores["a.weight"].flatten().sort(descending=True, stable=True).indices[:50]
    assert set(mask["a.weight"].flatten().nonzero().squeeze(1).tolist()) == set(top_a.tolist())
    with pytest.raises(ValueError, match="per-layer densities apply to scope layerwise, not global"):
        select(scores, dense, 0.25, "global", 0.0, {"a.*": 0.5})


def test_pat_with_layer_densities_end_to_end(tmp_path):
    spec = tiny_spec("prune_after_training", prune={**ONE_SHOT, "layer_density": {"fc1.weight": 0.5}})
    plan = build_plan(spec)
    assert plan.rounds[1].mask.fields["layer_density"] == {"fc1.weight": 0.5}
    plain = build_plan(tiny_spec("prune_after_training", prune=ONE_SHOT))
    assert "layer_density" not in plain.rounds[1].mask.fields  # the key of a mask without it is unchanged
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    mask = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    assert {n: int(m.sum()) for n, m in mask.items()} == {
        "fc1.weight": round(mask["fc1.weight"].numel() * 0.5),
        "fc2.weight": round(300 * 100 * 0.1), "fc3.weight": round(100 * 10 * 0.1)}


def test_filter_families_take_their_density_from_their_first_layer():
    model = build_model("resnet20", (3, 8, 8), 10, seed=0, width=0.5)
    gen = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(m.shape, generator=gen) for n, m in dense_mask(model).items()}
    mask = structured.select_filters(model, scores, dense_mask(model), 0.5, "l1",
                                     layer_density={"layer3.*": 0.25, "conv1.weight": 1.0})
    kept = structured.kept_filters(model, mask)
    assert int(kept["conv1"].sum()) == 8  # the stage-1 stream (named by the stem) keeps all
    assert int(kept["layer3.1.conv1"].sum()) == 8 and int(kept["layer3.0.conv2"].sum()) == 8  # 32 · 0.25
    assert int(kept["layer2.1.conv1"].sum()) == 8  # unnamed: 16 · 0.5


def test_bad_layer_densities_are_refused_by_name():
    with pytest.raises(SpecError, match=r"^prune.layer_density: per-layer densities replace scope layerwise's one "
                                        r"density; allowed with scope layerwise \(got global\)"):
        tiny_spec("prune_after_training", prune={**ONE_SHOT, "scope": "global", "layer_density": {"fc1.weight": 0.5}})
    with pytest.raises(SpecError, match=r"^prune.layer_density: the densities are the mask's, in one round; "
                                        r"allowed with rounds: 1 \(got 2\)"):
        tiny_spec("lottery_ticket", prune={"scope": "layerwise", "layer_density": {"fc1.weight": 0.5}})
    with pytest.raises(SpecError, match=r"^prune.layer_density: 'fc9\*' names no pruned parameter of "
                                        r"lenet_300_100; allowed: fc1.weight, fc2.weight, fc3.weight"):
        tiny_spec("prune_after_training", prune={**ONE_SHOT, "layer_density": {"fc9*": 0.5}})
    with pytest.raises(SpecError, match=r"^prune.layer_density: 'fc3.weight' names no pruned parameter"):
        tiny_spec("prune_after_training", prune={**ONE_SHOT, "ignore": ["fc3.weight"],
                                                 "layer_density": {"fc3.weight": 0.5}})
    with pytest.raises(SpecError, match=r"^prune.layer_density: 'fc3.weight' keeps 0 of the 1,000 units of "
                                        r"fc3.weight \(density 0.0001\)"):
        tiny_spec("prune_after_training", prune={**ONE_SHOT, "layer_density": {"fc3.weight": 0.0001}})
    with pytest.raises(SpecError, match=r"^prune.layer_density.fc1.weight: Input should be less than or equal to 1"):
        tiny_spec("prune_after_training", prune={**ONE_SHOT, "layer_density": {"fc1.weight": 1.5}})
