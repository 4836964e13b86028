"""The GPU-sized CIFAR recipes (configs/recipes/): each loads as a sweep, says it is GPU-sized and
carries its paper's settings, and one spec of each runs end to end on CPU with CIFAR swapped for
CIFAR-shaped synthetic data and one epoch."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from pai_core.paradigms import build_plan
from pai_core.spec_io import apply_overrides, parse_spec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.sweep import load_sweep

RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
SMALL = ["data.dataset=synthetic_cifar", "data.val_size=100", "train.epochs=1", "train.lr_schedule=constant",
         "train.milestones=[]", "data.batch_size=64"]


def test_there_are_graSP_and_synflow_recipes():
    names = {p.stem for p in RECIPES}
    assert {"grasp_cifar10_vgg19", "grasp_cifar10_resnet32", "grasp_cifar100_vgg19", "grasp_cifar100_resnet32",
            "synflow_cifar10_vgg16", "synflow_cifar10_resnet20"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_gpu_sized_and_follows_its_paper(path: Path):
    text = path.read_text()
    assert text.startswith("# GPU-sized."), "configs/ are CPU-sized unless marked"
    sweep = load_sweep(path)
    specs = sweep.expand()
    assert {s.seed for s in specs} >= {0, 1} and len({s.prune.sparsity for s in specs}) == 3
    for spec in specs:
        assert spec.data.dataset in ("cifar10", "cifar100") and spec.data.augment_kinds == ("crop", "flip")
        assert spec.train.epochs == 160 and spec.data.batch_size == 128 and spec.train.optimizer == "sgd"
        expected_rounds = 100 if spec.prune.criterion == "synflow" else 1
        assert spec.prune.rounds == expected_rounds, "each criterion keeps its own paper's schedule"
    if path.stem.startswith("grasp"):
        assert "SNIP" in text and "GraSP" in text and "dense" in text  # the paper's numbers beside it
        assert {s.prune.criterion for s in specs} == {"grasp", "snip", "random"}


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["grasp_cifar10_resnet32", "synflow_cifar10_resnet20"])
def test_recipe_runs_end_to_end_on_cpu_with_synthetic_cifar(tmp_path, stem):
    sweep = load_sweep(ROOT / "configs" / "recipes" / f"{stem}.yaml")
    spec = sweep.expand()[0]
    raw = apply_overrides(spec.model_dump(mode="json"), [*SMALL, "device=cpu"])
    small = parse_spec(raw)
    plan = build_plan(small)
    train = plan.rounds[1].trained
    assert train.fields["data"]["augment"] == ["crop", "flip"], "CIFAR-like data trains with crop+flip"
    pruned = plan.nodes_by_round()[1]  # the pruned round and the init it starts from; no dense baseline
    needed = [n for n in plan.nodes if n in pruned or n.key in {d.key for m in pruned for d in m.inputs.values()}]
    refs = run_plan(needed, Runtime(Store(tmp_path), "cpu"))
    ev = refs[plan.rounds[1].evaluate.key].info
    assert ev.sparsity == pytest.approx(small.prune.sparsity, abs=1e-3)
    assert 0.0 <= ev.test_acc <= 1.0
