"""ERK budgets and the layer-collapse check."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_spec
from pai_core.collapse import LayerCollapse, collapse_report
from pai_core.masks import dense_mask
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.selection import erk_counts, select
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store


def test_erk_counts_by_hand():
    # raw = Σdims/Πdims = 0.2 and 0.11; total 550; ε = 550 / (0.2·100 + 0.11·1000) = 4.2308:
    # 84.62 and 465.38 → floors 84 + 465 = 549, the larger remainder (layer 0) gets the last one.
    assert erk_counts([(10, 10), (100, 10)], 0.5) == [85, 465]


def test_erk_keeps_a_small_layer_dense_and_the_total_exact():
    counts = erk_counts([(2, 2), (300, 784), (10, 300)], 0.1)
    assert counts[0] == 4 and sum(counts) == round((4 + 300 * 784 + 3000) * 0.1)


def test_select_with_erk_scope_uses_the_erk_budget():
    model = build_model("conv4", (3, 32, 32), 10, seed=0)
    mask = dense_mask(model)
    scores = {n: p.detach().abs() for n, p in model.named_parameters() if n in mask}
    new = select(scores, mask, 0.05, scope="erk")
    assert [int(m.sum()) for m in new.values()] == erk_counts([tuple(m.shape) for m in mask.values()], 0.05)


def test_collapse_report_finds_empty_layers_and_cut_paths():
    model = build_model("lenet_300_100", (1, 28, 28), 10, seed=0)
    mask = dense_mask(model)
    assert collapse_report(model, mask, (1, 28, 28)) == {"empty_layers": [], "connected": True, "collapsed": False}
    cut = {n: torch.zeros_like(m) for n, m in mask.items()}
    cut["fc1.weight"][0, 0] = True   # input 0 → hidden unit 0
    cut["fc2.weight"][0, 1] = True   # hidden unit 1 → second layer unit 0: unit 1 has no input
    cut["fc3.weight"][0, 0] = True
    report = collapse_report(model, cut, (1, 28, 28))
    assert report["empty_layers"] == [] and not report["connected"] and report["collapsed"]
    cut["fc2.weight"][0, 0] = True   # now 0 → 0 → 0 is a path
    assert collapse_report(model, cut, (1, 28, 28))["connected"]


def test_skip_connections_keep_a_resnet_connected():
    model = build_model("resnet20", (3, 32, 32), 10, seed=0)
    mask = dense_mask(model)
    mask["layer1.0.conv1.weight"].zero_()
    report = collapse_report(model, mask, (3, 32, 32))
    assert report["connected"] and report["empty_layers"] == ["layer1.0.conv1.weight"]


def at_init(criterion, schedule, on_collapse):
    return tiny_spec("prune_at_init", prune={"criterion": criterion, "rate": None, "sparsity": 0.9995,
                                             "on_collapse": on_collapse, **schedule})


def test_magnitude_at_init_collapses_and_is_refused_or_recorded(tmp_path):
    spec = at_init("magnitude", {"schedule": "one_shot", "rounds": 1}, "error")
    with pytest.raises(LayerCollapse, match="fc1.weight"):
        run_plan(build_plan(spec).nodes, Runtime(Store(tmp_path / "a"), "cpu"))
    spec = at_init("magnitude", {"schedule": "one_shot", "rounds": 1}, "warn")
    plan = build_plan(spec)
    refs = run_plan(plan.nodes, Runtime(Store(tmp_path / "b"), "cpu"))
    assert refs[plan.rounds[1].mask.key].info.collapse["collapsed"]


def test_iterative_synflow_reaches_the_same_sparsity_without_collapse(tmp_path):
    spec = at_init("synflow", {"schedule": "iterative", "rounds": 100}, "error")
    plan = build_plan(spec)
    refs = run_plan(plan.nodes, Runtime(Store(tmp_path), "cpu"))
    info = refs[plan.rounds[1].mask.key].info
    assert not info.collapse["collapsed"]
    assert info.max_sparsity_without_collapse == pytest.approx(info.sparsity) and info.sparsity > 0.9994


def test_synflow_reaches_maximum_compression_on_lenet_300_100(tmp_path):
    """Keep 3 of 266,200 weights, one per layer: the most a 3-layer net can be compressed
    and still carry a signal. Iterative SynFlow gets there without emptying a layer."""
    from pai_core.spec_io import load_spec
    from conftest import ROOT

    spec = load_spec(ROOT / "configs/prune_at_init/synflow_lenet300_mnist.yaml",
                     [f"prune.sparsity={1 - 3 / 266_200}", "device=cpu"])
    mask_node = build_plan(spec).rounds[1].mask
    refs = run_plan([mask_node.inputs["weights"], mask_node], Runtime(Store(tmp_path), "cpu"))
    info = refs[mask_node.key].info
    assert info.layers["total"]["kept"] == 3
    assert [info.layers[n]["kept"] for n in ("fc1.weight", "fc2.weight", "fc3.weight")] == [1, 1, 1]
    assert info.collapse == {"empty_layers": [], "connected": True, "collapsed": False}


# ---------------------------------------------------------------- uniform+ (Gale et al. 2019)

def test_uniform_plus_counts_by_hand():
    from pai_core.selection import uniform_plus_counts
    shapes = [(4, 1, 3, 3), (10, 36), (10, 10), (5, 10)]  # 36, 360, 100, 50 weights: 546
    # density 0.2 keeps 109: the first conv dense (36) leaves 73 for 510 weights, 14.3 %, which would
    # give the last layer 7 < round(0.2 · 50) = 10; so it keeps 10 and the middle shares 63 / 460:
    # 49.30 and 13.70, floors 49 + 13, the one left over to the larger remainder.
    assert uniform_plus_counts(shapes, 0.2) == [36, 49, 14, 10]
    # density 0.5 keeps 273: 237 / 510 = 46.5 % everywhere but the first conv, the last above its floor.
    assert uniform_plus_counts(shapes, 0.5) == [36, 167, 47, 23]
    # an MLP's first layer is no conv, so it is pruned like the middle (LAMP's code)
    assert uniform_plus_counts([(300, 784), (100, 300), (10, 100)], 0.02) == [4544, 580, 200]


def test_uniform_plus_scope_keeps_the_first_conv_whole_and_the_exact_total():
    model = build_model("conv2", (1, 16, 16), 10, seed=0)
    mask = dense_mask(model)
    scores = {n: torch.rand(m.shape, generator=torch.Generator().manual_seed(1)) for n, m in mask.items()}
    new = select(scores, mask, 0.05, scope="uniform_plus")
    names = list(mask)
    assert bool(new[names[0]].all()) and mask[names[0]].dim() == 4
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in new.values()) == round(total * 0.05)
    assert int(new[names[-1]].sum()) == round(0.2 * mask[names[-1]].numel())
    middle = [int(new[n].sum()) / new[n].numel() for n in names[1:-1]]
    assert max(middle) - min(middle) < 1e-3


def test_uniform_plus_past_the_first_conv_is_refused_by_name():
    from conftest import tiny_raw
    from pai_core.spec_io import SpecError, parse_spec
    with pytest.raises(SpecError, match=r"prune\.sparsity: scope uniform_plus keeps the first conv dense, 576 "
                                        r"weights, more than the .* allowed: a lower sparsity, or another scope"):
        parse_spec(tiny_raw("prune_at_init", model={"name": "conv2"}) | {"prune": {
            "criterion": "random", "schedule": "one_shot", "sparsity": 0.9999, "scope": "uniform_plus"}})
