"""The GPU-sized CIFAR recipes (configs/recipes/): each loads as a sweep, says it is GPU-sized and
carries its paper's settings, and runs end to end on CPU with CIFAR swapped for CIFAR-shaped
synthetic data and one epoch (the PaI recipes) or a few iterations (the PaT and LTH ones).

Each recipe family has its own test of the facts that could drift silently: the PaI recipes'
criteria and sparsities; the lottery-ticket recipes' open_lth schedule, 20 % per round and which
layers are pruned; Renda et al.'s two rewinding arms sharing one dense training; Li et al.'s
skipped layers and per-stage filter counts, checked against the paper's FLOP reductions."""
from __future__ import annotations

import fnmatch
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import ROOT, loadable_config
from pai_core import prune_checks, structured
from pai_core.criteria import get_criterion
from pai_core.models.registry import build_model
from pai_core.paradigms import build_plan
from pai_core.spec_io import apply_overrides, parse_spec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.sweep import load_sweep, unique_nodes

RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
IMAGENET = ("lth_imagenet_resnet50",)  # read an image folder: validated against a tiny generated one
SMALL = ["data.dataset=synthetic_cifar", "data.val_size=100", "train.epochs=1", "train.lr_schedule=constant",
         "train.milestones=[]", "data.batch_size=64"]


def test_there_are_graSP_and_synflow_recipes():
    names = {p.stem for p in RECIPES}
    assert {"grasp_cifar10_vgg19", "grasp_cifar10_resnet32", "grasp_cifar100_vgg19", "grasp_cifar100_resnet32",
            "synflow_cifar10_vgg16", "synflow_cifar10_resnet20"} <= names


# Every recipe belongs to a family with its own test below; a new family needs its own.
FAMILIES = ("grasp_", "synflow_", "ntk_sap_", "lth_", "lr_rewinding_", "l1_filter_", "instability_", "lamp_")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_gpu_sized_and_follows_its_paper(path: Path, tmp_path):
    text = path.read_text()
    assert text.startswith("# GPU-sized."), "configs/ are CPU-sized unless marked"
    assert path.stem.startswith(FAMILIES), f"{path.stem}: add its family's test to tests/test_recipes.py"
    sweep = load_sweep(loadable_config(path, tmp_path))
    specs = sweep.expand()
    assert {s.seed for s in specs} >= {0, 1}
    if path.stem in IMAGENET:  # its own test below; the folder's workers crop and flip
        assert all(s.data.dataset == "image_folder" and s.data.augment_kinds == () for s in specs)
        return
    for spec in specs:
        assert spec.data.dataset in ("cifar10", "cifar100") and spec.data.augment_kinds == ("crop", "flip")
        if not path.stem.startswith("lamp_"):  # LAMP's code trains with AdamW at batch 100 (its own test)
            assert spec.data.batch_size == 128 and spec.train.optimizer == "sgd" and spec.train.momentum == 0.9
    if path.stem.startswith(("grasp_", "synflow_")):  # pruning at init: one training per sparsity
        assert len({s.prune.sparsity for s in specs}) == 3
        for spec in specs:
            assert spec.flow == "prune_at_init" and spec.train.epochs == 160
            expected_rounds = 100 if spec.prune.criterion == "synflow" else 1
            assert spec.prune.rounds == expected_rounds, "each criterion keeps its own paper's schedule"
    if path.stem.startswith("grasp"):
        assert "SNIP" in text and "GraSP" in text and "dense" in text  # the paper's numbers beside it
        assert {s.prune.criterion for s in specs} == {"grasp", "snip", "random"}


def test_ntk_sap_recipe_follows_its_script():
    """scripts/run.sh of YiteWang/NTK-SAP: densities 0.8^c for its compression list, 20 rounds of
    5 fresh inits, lr 0.1 ×0.1 at [80, 120], wd 1e-4; SynFlow keeps its own 100 rounds."""
    specs = _recipe("ntk_sap_cifar10_resnet20")
    densities = sorted({1 - s.prune.sparsity for s in specs})
    assert densities == pytest.approx(sorted(0.8 ** c for c in range(2, 19, 2)), abs=1e-9)
    assert {s.prune.criterion for s in specs} == {"ntk_sap", "synflow", "snip", "random"}
    for spec in specs:
        assert spec.model.params.get("shortcut", "B") == "B" and not spec.prune.ignore  # lottery ResNet-20, fc pruned
        assert (spec.train.lr, tuple(spec.train.milestones), spec.train.gamma) == (0.1, (80, 120), 0.1)
        assert spec.train.weight_decay == 1e-4 and spec.train.epochs == 160
        rounds = {"ntk_sap": 20, "synflow": 100}.get(spec.prune.criterion, 1)
        assert spec.prune.rounds == rounds and (rounds == 1 or spec.prune.schedule == "iterative")
        if spec.prune.criterion == "ntk_sap":
            assert spec.prune.params == {} and get_criterion("ntk_sap").Params().samples == 5


def test_lamp_recipe_follows_its_code():
    """jaeho-lee/layer-adaptive-sparsity's 'vgg16': AdamW 3e-4 (torch's decay 0.01), batch 100, 50k
    steps, then 20 iterations of pruning 20 % of what is left and 40k steps from the pruned weights;
    every Conv/Linear weight pruned; PyTorch's default init; the five allocations on one pretrain."""
    specs = _recipe("lamp_cifar10_vgg16")
    assert {s.seed for s in specs} == {0, 1, 2}
    assert {(s.prune.criterion, s.prune.scope) for s in specs} == {
        ("lamp", "global"), ("magnitude", "global"), ("magnitude", "layerwise"), ("magnitude", "uniform_plus"),
        ("magnitude", "erk")}
    for spec in specs:
        assert spec.flow == "prune_after_training" and spec.data.batch_size == 100
        assert spec.model.name == "vgg16" and spec.model.params == {"weight_init": "torch", "bias_init": "torch"}
        for train, steps in ((spec.train, 50_000), (spec.retrain, 40_000)):
            assert (train.optimizer, train.lr, train.weight_decay) == ("adamw", 3e-4, 0.01)
            assert (train.iterations, train.lr_schedule, train.warmup_iterations) == (steps, "constant", 0)
        assert (spec.prune.schedule, spec.prune.rate, spec.prune.rounds) == ("iterative", 0.2, 20)
        assert not spec.prune.ignore and not spec.prune.prune_biases and spec.prune.min_density == 0
    for seed in (0, 1, 2):  # one dense training per seed serves all five allocations
        assert len({build_plan(s).rounds[0].trained.key for s in specs if s.seed == seed}) == 1


def _recipe(stem: str, tmp: Path | None = None) -> list:
    path = ROOT / "configs" / "recipes" / f"{stem}.yaml"
    return load_sweep(loadable_config(path, tmp) if tmp else path).expand()


IMAGENET_EPOCH = math.ceil(1_281_167 / 1024)  # open_lth's iterations per ImageNet epoch at batch 1024


def test_lth_imagenet_recipe_follows_open_lth(tmp_path):
    """models/imagenet_resnet.py default_hparams: batch 1024, lr 0.4 with 5 warmup epochs, x0.1 at
    30/60/80 of 90, decay 1e-4, 20 % a round, global, nothing ignored; kaiming_normal weights and
    uniform BatchNorm; the folder is named by root (under PAI_DATA), 224 pixels."""
    specs = _recipe("lth_imagenet_resnet50", tmp_path)
    assert {s.seed for s in specs} == {0, 1}
    text = (ROOT / "configs/recipes/lth_imagenet_resnet50.yaml").read_text()
    assert re.search(r"^\s*root: imagenet$", text, flags=re.M), "a root under PAI_DATA, no machine's path"
    for spec in specs:
        t, p = spec.train, spec.prune
        assert spec.model.name == "resnet50" and spec.model.params == {"weight_init": "kaiming_normal",
                                                                        "bn_init": "uniform"}
        assert spec.data.batch_size == 1024 and spec.data.image_size == 224
        assert (spec.data.crop_scale, spec.data.crop_ratio) == ((0.1, 1.0), (0.8, 1.25))  # its RandomResizedCrop
        assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.gamma) == ("sgd", 0.4, 0.9, 1e-4, 0.1)
        assert t.iterations == 90 * IMAGENET_EPOCH and t.warmup_iterations == 5 * IMAGENET_EPOCH
        assert t.milestones == tuple(e * IMAGENET_EPOCH for e in (30, 60, 80)) and t.lr_schedule == "step"
        assert (p.criterion, p.scope, p.rate, p.ignore, p.rewind_optimizer) == ("magnitude", "global", 0.2, [], "fresh")
        assert p.rewind_iter == 5 * IMAGENET_EPOCH and not p.prune_biases


OPEN_LTH_EPOCH = math.ceil(50_000 / 128)  # open_lth's iterations per CIFAR-10 epoch (datasets/base.py)


@pytest.mark.parametrize("stem, rewind, ignore, prunable, paper_density_round", [
    # ResNet-20 (shortcut B) prunes every conv and the fc: 432 + 6*2304 + (4608 + 5*9216) + 512
    # + (18432 + 5*36864) + 2048 + 640 = 270,896 weights; LMC's 16.8 % density is round 8.
    ("lth_cifar10_resnet20", 2000, [], 270_896, 8),
    # VGG-16 keeps fc.weight dense (open_lth's pruning_layers_to_ignore): its 13 convs hold
    # 1728 + 36864 + 73728 + 147456 + 294912 + 2*589824 + 1179648 + 5*2359296 = 14,710,464; 1.5 % is round 19.
    ("lth_cifar10_vgg16", 1000, ["fc.weight"], 14_710_464, 19),
])
def test_lottery_recipes_follow_open_lth(stem, rewind, ignore, prunable, paper_density_round):
    specs = _recipe(stem)
    assert {s.seed for s in specs} == {0, 1, 2}
    for spec in specs:
        t, p = spec.train, spec.prune
        assert spec.flow == "lottery_ticket" and t.lr == 0.1 and t.weight_decay == 1e-4 and t.gamma == 0.1
        assert t.warmup_iterations == 0 and not t.nesterov, "open_lth's defaults have no warmup"
        # 160 epochs, x0.1 at 80 and 120, counted in open_lth's iterations (45k examples train here)
        assert t.iterations == 160 * OPEN_LTH_EPOCH and t.milestones == (80 * OPEN_LTH_EPOCH, 120 * OPEN_LTH_EPOCH)
        assert (p.criterion, p.scope, p.rate, p.rewind_iter, p.ignore) == ("magnitude", "global", 0.2, rewind, ignore)
        assert not p.reinit_control and spec.retrain is None
        # open_lth's init and rewinding: BN weights U(0, 1), PyTorch's default biases, a fresh SGD at k
        assert spec.model.params | {"last_pool": False} == {"bn_init": "uniform", "bias_init": "torch", "last_pool": False}
        assert p.rewind_optimizer == "fresh"
        assert spec.model.name != "vgg16" or spec.model.params["last_pool"] is False, "the head averages 2x2"
        assert sum(math.prod(shape) for _, shape in prune_checks.weight_layers(spec, False, p.ignore)) == prunable
        assert p.round_densities()[paper_density_round - 1] == pytest.approx(0.8 ** paper_density_round)
        assert p.rounds >= paper_density_round, "the sweep reaches the density the paper reports"


def test_instability_recipe_shares_the_lth_recipe_at_its_rewind_point():
    """Frankle et al.'s analysis on the LTH recipe's training: at k = 2000 the first copies, masks
    and retrainings are the LTH recipe's own nodes; the paths are the dense net and round 8."""
    lth = {s.seed: build_plan(s) for s in _recipe("lth_cifar10_resnet20")}
    for spec in _recipe("instability_cifar10_resnet20"):
        plan = build_plan(spec)
        assert spec.instability.rewind_iters == [0, 100, 500, 2000, 5000] and spec.instability.splits == ["test"]
        assert [r.name for r in plan.rounds if r.rewind_iter == 2000] == ["k=2000 dense", "k=2000 round 8"]
        theirs = {r.index: r for r in lth[spec.seed].rounds}
        dense, round8 = (r for r in plan.rounds if r.rewind_iter == 2000)
        assert round8.trained.key == theirs[8].trained.key and round8.evaluate.key == theirs[8].evaluate.key
        # a fresh optimizer at k: the dense first copy is a new training from the LTH recipe's own w_k
        assert dense.trained.fields["optimizer_state"] == "fresh"
        assert dense.trained.inputs["start"].key == theirs[8].trained.inputs["start"].key
        assert 1 - plan.rounds[-1].density == pytest.approx(1 - 0.8 ** 8)


def test_lr_rewinding_recipe_compares_both_arms_on_one_dense_training():
    specs = _recipe("lr_rewinding_cifar10_resnet56")
    assert sorted(s.flow for s in specs) == ["lottery_ticket"] * 3 + ["lr_rewinding"] * 3
    for spec in specs:
        t, p = spec.train, spec.prune
        assert spec.model.name == "resnet56" and spec.model.params == {"shortcut": "B"}, "TF ResNet v1 projections"
        # Renda et al.'s cifar10_main.py: 182 epochs (71,108 steps), x0.1 at epochs 91 and 136 of 390.625 steps
        assert t.iterations == 71_108 and t.milestones == (int(390.625 * 91), int(390.625 * 136)) == (35_546, 53_125)
        assert (t.lr, t.weight_decay, t.warmup_iterations, t.gamma) == (0.1, 2e-4, 0, 0.1)
        assert (p.criterion, p.scope, p.rate, p.rounds, p.ignore) == ("magnitude", "global", 0.2, 17, [])
        if spec.flow == "lr_rewinding":
            assert p.lr_rewind_iter == 0, "the paper's algorithm replays the whole schedule"
            assert p.optimizer == "keep", "the authors' code keeps the momentum buffers"
        else:
            assert p.rewind_iter == 4701, "the reference README's rewind checkpoint (epoch 12)"
    # every conv, the 1x1 projections and the fc are pruned: 432 + 18*2304 + (4608 + 17*9216) + 512
    # + (18432 + 17*36864) + 2048 + 640 = 851,504 weights
    assert sum(math.prod(s) for _, s in prune_checks.weight_layers(specs[0], False, [])) == 851_504
    seed0 = {s.flow: build_plan(s) for s in specs if s.seed == 0}
    lr, weight = seed0["lr_rewinding"], seed0["lottery_ticket"]
    assert lr.rounds[0].trained.key == weight.rounds[0].trained.key, "one dense training for both arms"
    assert lr.rounds[1].mask.key == weight.rounds[1].mask.key, "and one round-1 mask"
    assert lr.rounds[1].trained.key != weight.rounds[1].trained.key


# Li et al. (2017) number convs as res56prune.py does: the stem is 1, block b of stage s has conv1 = 2 + 2(9s + b).
LI_SKIPPED = {"A": (16, 20, 38, 54), "B": (16, 18, 20, 34, 38, 54)}
LI_RATES = {"A": (0.1, 0.1, 0.1), "B": (0.6, 0.3, 0.1)}
# Table 1: FLOPs pruned 10.4 % (A), 27.6 % (B); parameters 9.4 %, 13.7 %
LI_REDUCTION = {"A": (0.104, 0.094), "B": (0.276, 0.137)}


def _li_name(conv: int) -> str:
    s, b = divmod((conv - 2) // 2, 9)
    return f"layer{s + 1}.{b}.conv1.weight"


def test_li_layer_numbering_maps_to_block_first_convs():
    assert [_li_name(c) for c in (2, 16, 18, 20, 34, 38, 54)] == [
        "layer1.0.conv1.weight", "layer1.7.conv1.weight", "layer1.8.conv1.weight", "layer2.0.conv1.weight",
        "layer2.7.conv1.weight", "layer3.0.conv1.weight", "layer3.8.conv1.weight"]


@pytest.mark.parametrize("variant", ["A", "B"])
def test_l1_filter_recipe_is_li_et_al_resnet56_pruned(variant):
    specs = [s for s in _recipe("l1_filter_cifar10_resnet56") if s.name.split("[")[0].endswith(variant.lower())]
    assert {s.seed for s in specs} == {0, 1, 2}
    spec = specs[0]
    t, r, p = spec.train, spec.retrain, spec.prune
    assert spec.flow == "prune_after_training" and spec.model.name == "resnet56" and spec.model.params == {}
    # He et al.: lr 0.1, /10 at 32k and 48k, 64k iterations, wd 1e-4; Li et al.: retrain 40 epochs at lr 0.001
    assert (t.lr, t.iterations, t.milestones, t.gamma, t.weight_decay) == (0.1, 64_000, (32_000, 48_000), 0.1, 1e-4)
    assert (r.lr, r.epochs, r.lr_schedule, r.weight_decay, r.momentum) == (0.001, 40, "constant", 1e-4, 0.9)
    assert (p.criterion, p.schedule, p.structure, p.filter_norm, p.filter_layers, p.scope, p.physical) == (
        "magnitude", "one_shot", "filter", "l1", "unshared", "layerwise", True)
    assert sorted(p.ignore) == sorted(_li_name(c) for c in LI_SKIPPED[variant]), "the paper's sensitive layers"
    # res56prune.py keeps int(n * (1 - p)) filters of each pruned layer
    counts = {f"layer{s + 1}.*": int(n * (1 - rate)) / n
              for s, (n, rate) in enumerate(zip((16, 32, 64), LI_RATES[variant]))}
    assert p.layer_density == counts
    families = [f for f, _ in p.filter_units(spec)]
    assert len(families) == 27 - len(LI_SKIPPED[variant])
    assert all(any(fnmatch.fnmatchcase(f"{f}.weight", pat) for pat in p.layer_density) for f in families), \
        "every candidate is named, so prune.sparsity is nominal"

    # the mask the recipe's plan makes (scores |w|) removes the paper's share of FLOPs and weights
    fields = build_plan(spec).rounds[1].mask.fields
    info = spec.data.info
    model = build_model(spec.model.name, info.in_shape, info.num_classes, 0, **spec.model.params)
    scores = {n: w.detach().abs() for n, w in model.named_parameters() if n in prune_checks.prunable_names(model, False)}
    previous = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    mask = structured.select_filters(model, scores, previous, fields["density"], fields["filter_norm"],
                                     fields["min_density"], fields["scope"], fields["filter_layers"], False,
                                     fields["ignore"], fields["layer_density"])
    dense, pruned = structured.cost(model, info.in_shape), structured.cost(model, info.in_shape, mask)
    assert dense["flops"] == 2 * 125_485_696  # conv + fc multiply-adds of ResNet-56 (A), Li et al.'s 1.25E8
    flops_cut, weights_cut = LI_REDUCTION[variant]
    assert 1 - pruned["flops"] / dense["flops"] == pytest.approx(flops_cut, abs=5e-4)
    assert 1 - pruned["weights"] / dense["weights"] == pytest.approx(weights_cut, abs=1e-3)
    for conv in range(2, 56, 2):  # every block's first conv: all its filters if skipped, else int(n * (1 - p))
        name, stage = _li_name(conv), (conv - 2) // 18
        width = (16, 32, 64)[stage]
        expected = width if conv in LI_SKIPPED[variant] else int(width * (1 - LI_RATES[variant][stage]))
        assert int(mask[name].flatten(1).any(1).sum()) == expected, name


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["grasp_cifar10_resnet32", "synflow_cifar10_resnet20", "ntk_sap_cifar10_resnet20"])
def test_recipe_runs_end_to_end_on_cpu_with_synthetic_cifar(tmp_path, stem):
    sweep = load_sweep(ROOT / "configs" / "recipes" / f"{stem}.yaml")
    spec = sweep.expand()[0]
    extra = ["prune.rounds=2", "prune.params.samples=1"] if stem.startswith("ntk_sap") else []  # its 100 passes
    raw = apply_overrides(spec.model_dump(mode="json"), [*SMALL, "device=cpu", *extra])
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


# The PaT / LTH recipes' nets are ResNet-56 and VGG-16: 4 iterations of 16 synthetic CIFAR images per
# training, one round (the flows' later rounds are tested in their own files).
SMALL_ITERATIONS = [*(o for o in SMALL if o not in ("train.epochs=1", "data.batch_size=64")), "train.iterations=4",
                    "data.batch_size=16", "device=cpu"]
PER_FLOW = {"lottery_ticket": ["prune.rounds=1", "prune.rewind_iter=2"], "lr_rewinding": ["prune.rounds=1"],
            "prune_after_training": ["retrain.epochs=null", "retrain.iterations=4"],
            "instability": ["prune.rounds=1", "instability.rewind_iters=[0,2]", "instability.rounds=[0,1]",
                            "instability.alphas=3"]}


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["lth_cifar10_resnet20", "lth_cifar10_vgg16", "lr_rewinding_cifar10_resnet56",
                                  "l1_filter_cifar10_resnet56", "instability_cifar10_resnet20", "lamp_cifar10_vgg16"])
def test_pat_and_lth_recipes_run_end_to_end_on_cpu_with_synthetic_cifar(tmp_path, stem):
    """Every base spec of the recipe (seed 0), its whole plan, shared stages run once."""
    # 2 of LAMP's 20 iterative rounds, for each of its 5 allocations: at a quarter of the width
    per_recipe = {"lamp_cifar10_vgg16": ["prune.rounds=2", "model.width=0.25"]}
    specs = [parse_spec(apply_overrides(s.model_dump(mode="json"),
                                        [*SMALL_ITERATIONS, *PER_FLOW[s.flow], *per_recipe.get(stem, [])]))
             for s in _recipe(stem) if s.seed == 0]
    plans = [build_plan(s) for s in specs]
    refs = run_plan(unique_nodes(plans), Runtime(Store(tmp_path), "cpu"))
    for spec, plan in zip(specs, plans):
        assert plan.rounds[0].trained.fields["data"]["augment"] == ["crop", "flip"]
        for rnd in plan.rounds[1:]:
            ev = refs[rnd.evaluate.key].info
            assert 0.0 <= ev.test_acc <= 1.0
            if spec.prune.structure == "filter":  # Li et al.: the smaller net is built, with the paper's FLOPs
                cost = refs[rnd.mask.key].info.structured
                cut = 1 - cost["pruned"]["flops"] / cost["dense"]["flops"]
                assert cut == pytest.approx(LI_REDUCTION[spec.name.split("[")[0][-1].upper()][0], abs=5e-4)
                assert ev.physical is not None and ev.physical.cost["flops"] == cost["pruned"]["flops"]
            elif spec.flow == "instability":  # each row's path, from the round's own copies
                assert refs[rnd.analysis.key].info.instability["test"] >= 0.0
            else:
                assert ev.sparsity == pytest.approx(1 - 0.8 ** rnd.index, abs=1e-4)


@pytest.mark.slow
def test_lth_imagenet_recipe_runs_end_to_end_on_a_tiny_image_folder(tmp_path):
    """The recipe's own spec (seed 0) through its whole plan on CPU: ResNet-50 on 32-pixel crops of a
    generated 3-class folder, 4 iterations a training, one round rewound to iteration 2; the
    folder streams through its loader workers' RandomResizedCrop and flip."""
    spec = next(s for s in _recipe("lth_imagenet_resnet50", tmp_path) if s.seed == 0)
    small = ["train.iterations=4", "train.warmup_iterations=1", "train.milestones=[2]", "data.batch_size=4",
             "data.image_size=32", "data.val_size=3", "prune.rounds=1", "prune.rewind_iter=2", "device=cpu"]
    small_spec = parse_spec(apply_overrides(spec.model_dump(mode="json"), small))
    plan = build_plan(small_spec)
    refs = run_plan(plan.nodes, Runtime(Store(tmp_path / "store"), "cpu"))
    ev = refs[plan.rounds[1].evaluate.key].info
    assert ev.sparsity == pytest.approx(0.2, abs=1e-4) and 0.0 <= ev.test_acc <= 1.0
    assert plan.rounds[1].trained.fields["data"]["dataset"] == "image_folder"
