"""N:M sparsity (`prune.structure: nm`): n of every m consecutive input weights of each row are
kept, exactly; the pattern survives training; bad combinations are refused in one line before
any compute; unstructured specs keep every key they had."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import ROOT, tiny_raw, tiny_spec
from pai_core.catalog import catalog
from pai_core.paradigms import build_plan
from pai_core.selection import select_nm
from pai_core.spec_io import SpecError, load_spec, parse_spec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store

NM = {"structure": "nm", "rate": None, "rounds": 1}  # over conftest's iterative 20 % x 2 rounds
NM_CONFIG = ROOT / "configs/prune_at_init/snip_nm24_lenet300_mnist.yaml"
SNIP_CONFIG = ROOT / "configs/prune_at_init/snip_lenet300_mnist.yaml"


def kept_per_group(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Kept weights in each group of m consecutive entries of `weight.reshape(out, -1)`'s rows."""
    return mask.reshape(mask.shape[0], -1).reshape(-1, m).sum(1)


# ----------------------------------------------------------------- selection, by hand

def test_hand_written_linear_gets_exactly_the_expected_2_4_mask():
    layer = nn.Linear(8, 2)  # 2 rows of 8 inputs: 2 groups of 4 per row
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, -1.0, -2.0, 4.0, 3.0],
                           [7.0, 6.0, 5.0, 8.0, 0.0, 0.2, 0.1, 0.3]])
    previous = {"weight": torch.ones_like(layer.weight, dtype=torch.bool)}
    mask = select_nm({"weight": scores}, previous, 2, 4)["weight"]
    assert mask.tolist() == [[False, True, True, False, False, False, True, True],
                             [True, False, False, True, False, True, False, True]]
    assert mask.dtype == torch.bool and mask.shape == layer.weight.shape


def test_ties_go_to_the_lower_index_and_dead_weights_are_never_revived():
    scores = {"w": torch.tensor([[1.0, 1.0, 1.0, 1.0, 5.0, 4.0, 3.0, 2.0]])}
    alive = {"w": torch.tensor([[True, True, True, True, False, False, False, True]])}
    mask = select_nm(scores, alive, 2, 4)["w"]
    # group 1: a four-way tie keeps the two lowest indices; group 2: only one survivor left, kept alone
    assert mask.tolist() == [[True, True, False, False, False, False, False, True]]
    # the survivors among still-alive weights win over higher scores of dead ones
    alive = {"w": torch.tensor([[False, True, True, True, False, True, True, True]])}
    assert select_nm(scores, alive, 2, 4)["w"].tolist() == [[False, True, True, False, False, True, True, False]]


def test_conv_layers_group_along_in_channels_times_kernel():
    conv = nn.Conv2d(2, 1, 2)  # one filter, row = in_channels x kh x kw = 2 x 2 x 2 in that flatten order
    scores = torch.tensor([[[[1.0, 4.0], [3.0, 2.0]],     # channel 0: the first group of 4
                            [[8.0, 5.0], [6.0, 7.0]]]])   # channel 1: the second
    mask = select_nm({"weight": scores}, {"weight": torch.ones_like(conv.weight, dtype=torch.bool)}, 2, 4)["weight"]
    assert mask.shape == conv.weight.shape
    assert mask[0, 0].tolist() == [[False, True], [True, False]]
    assert mask[0, 1].tolist() == [[True, False], [False, True]]


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8), (3, 4)])
def test_every_group_of_a_real_conv_keeps_n_best_of_m(n, m):
    conv = nn.Conv2d(8, 3, 3)  # rows of 8 x 3 x 3 = 72
    scores = torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(0))
    mask = select_nm({"weight": scores}, {"weight": torch.ones_like(conv.weight, dtype=torch.bool)}, n, m)["weight"]
    assert (kept_per_group(mask, m) == n).all()
    groups, kept = scores.reshape(-1, m), mask.reshape(-1, m)
    for g, k in zip(groups, kept):  # the kept ones are the group's n largest
        assert set(torch.topk(g, n).indices.tolist()) == set(k.nonzero().squeeze(1).tolist())
    assert mask.sum() == conv.weight.numel() * n // m


def test_selection_refuses_what_has_no_groups():
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        select_nm({"w": torch.ones(2, 6)}, {"w": torch.ones(2, 6, dtype=torch.bool)}, 2, 4)
    with pytest.raises(ValueError, match="1-D parameter"):
        select_nm({"b": torch.ones(8)}, {"b": torch.ones(8, dtype=torch.bool)}, 2, 4)
    with pytest.raises(ValueError, match="1 <= n < m"):
        select_nm({"w": torch.ones(2, 4)}, {"w": torch.ones(2, 4, dtype=torch.bool)}, 4, 4)


# ----------------------------------------------------------------- real plans

@pytest.mark.parametrize("flow, prune, model", [
    ("prune_at_init", {"criterion": "snip", "schedule": "one_shot"}, None),
    ("prune_at_init", {"criterion": "magnitude", "schedule": "one_shot", "n": 1, "m": 4}, None),
    ("prune_at_init", {"criterion": "magnitude", "schedule": "one_shot", "n": 2, "m": 8},
     {"name": "lenet_300_100", "width": 2}),  # rows 256, 600, 200: all multiples of 8
    ("lottery_ticket", {}, None),
    ("prune_after_training", {"schedule": "one_shot"}, None),
    ("lr_rewinding", {}, None),
], ids=["pai-snip-2:4", "pai-1:4", "pai-2:8", "lth-2:4", "pat-2:4", "lr-rewinding-2:4"])
def test_every_group_of_every_layer_keeps_exactly_n_of_m_and_training_keeps_the_pattern(tmp_path, flow, prune, model):
    over = {"prune": {**NM, **prune}} | ({"model": model} if model else {})
    spec = tiny_spec(flow, **over)
    n, m = spec.prune.n, spec.prune.m
    assert spec.prune.sparsity == pytest.approx(1 - n / m)
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    (rnd,) = [r for r in plan.rounds if r.mask is not None]
    assert rnd.mask.fields["structure"] == "nm" and (rnd.mask.fields["n"], rnd.mask.fields["m"]) == (n, m)
    mask = rt.store.load(refs[rnd.mask.key])["mask"]
    assert set(mask) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    for name, mk in mask.items():
        assert (kept_per_group(mk, m) == n).all(), name
    info = refs[rnd.mask.key].info
    assert info.sparsity == pytest.approx(1 - n / m)
    assert info.collapse is not None and not info.collapse["collapsed"]  # the collapse check ran
    weights = rt.store.load(refs[rnd.trained.key])["model"]
    for name, mk in mask.items():
        assert torch.count_nonzero(weights[name][~mk]) == 0, f"{name}: a pruned weight was revived"
        assert (kept_per_group(weights[name] != 0, m) <= n).all(), name  # still n:m after training
    assert torch.count_nonzero(weights["fc1.weight"][mask["fc1.weight"]]) > 0


def test_sanity_invert_of_an_nm_mask_is_its_complement_and_still_nm(tmp_path):
    spec = tiny_spec("sanity_checks", prune={**NM, "criterion": "magnitude", "schedule": "one_shot"},
                     sanity={"base": "prune_at_init", "checks": ["invert"]})
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    original, inverted = (r.mask for r in plan.rounds)
    a, b = (rt.store.load(refs[x.key])["mask"] for x in (original, inverted))
    for name in a:
        assert torch.equal(b[name], ~a[name]), name  # 2 of 4 kept: the inverse is the other 2
        assert (kept_per_group(b[name], 4) == 2).all()


# ----------------------------------------------------------------- refusals, one line each

def refused(raw: dict) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("flow, prune, starts, says", [
    ("prune_at_init", {"m": 8}, "prune.m: fc2.weight has 300 input weights per row", "not a multiple of m=8"),
    ("prune_at_init", {"sparsity": 0.9}, "prune.sparsity: structure nm keeps 2 of every 4 weights (sparsity 0.5)",
     "give 0.5 or leave it unset"),
    ("lottery_ticket", {"rate": 0.2}, "prune.rate: structure nm keeps 2 of every 4", "not 0.2"),
    ("lottery_ticket", {"rounds": 3, "rate": 0.2}, "prune.rounds:", "allowed: 1 (got 3)"),
    ("prune_at_init", {"schedule": "iterative", "rounds": 2, "sparsity": 0.5}, "prune.rounds:", "allowed: 1"),
    ("prune_after_training", {"schedule": "gradual", "sparsity": 0.5}, "prune.schedule:", "allowed: one_shot"),
    ("prune_at_init", {"prune_biases": True}, "prune.prune_biases:", "allowed: false"),
    ("prune_at_init", {"n": 4}, "prune.n: must be < m", "got n=4, m=4"),
    ("prune_at_init", {"n": 5, "m": 4}, "prune.n: must be < m", "got n=5"),
    ("prune_at_init", {"n": 0}, "prune.n:", "greater than or equal to 1"),
    ("prune_at_init", {"m": 1}, "prune.m:", "greater than or equal to 2"),
    ("prune_at_init", {"m": 2**70}, "prune.m:", "less than or equal to 1024"),
    ("prune_at_init", {"scope": "erk"}, "prune.scope: structure nm", "allowed: global"),
    ("prune_at_init", {"min_density": 0.1}, "prune.min_density: structure nm", "allowed: 0"),
], ids=["indivisible-layer", "sparsity-mismatch", "rate-mismatch", "lth-rounds-3", "pai-iterative-rounds-2",
        "pat-gradual", "prune-biases", "n-equals-m", "n-above-m", "n-zero", "m-one", "m-2**70", "scope-erk",
        "min-density"])
def test_nm_refusals_name_the_field(flow, prune, starts, says):
    base = {"schedule": "one_shot"} if flow == "prune_at_init" else {}
    msg = refused(tiny_raw(flow, prune={**NM, **base, **prune}))
    assert msg.startswith(starts), msg
    assert says in msg, msg


def test_a_conv_layer_is_checked_along_in_channels_times_kernel():
    # conv2's first conv has 1 input channel and a 3x3 kernel: rows of 9, which no m divides
    msg = refused(tiny_raw("prune_at_init", model={"name": "conv2"}, prune={**NM, "schedule": "one_shot"}))
    assert msg.startswith("prune.m: features.conv1.weight has 9 input weights per row"), msg
    assert msg.endswith("or prune.nm_indivisible: dense leaves such layers dense"), msg


def test_indivisible_layers_stay_dense_when_asked_and_the_rest_is_exactly_n_of_m(tmp_path):
    """As NVIDIA's ASP does for a first conv: rows m does not divide stay as they were."""
    spec = tiny_spec("prune_at_init", model={"name": "conv2"},
                     prune={**NM, "criterion": "magnitude", "schedule": "one_shot", "nm_indivisible": "dense"})
    plan = build_plan(spec)
    (rnd,) = [r for r in plan.rounds if r.mask is not None]
    assert rnd.mask.fields["nm_indivisible"] == "dense"  # it changes the mask, so it is in the key
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    mask = rt.store.load(refs[rnd.mask.key])["mask"]
    assert mask["features.conv1.weight"].all()  # rows of 9
    sparse = [n for n, mk in mask.items() if mk[0].numel() % 4 == 0]
    assert len(sparse) == len(mask) - 1
    for name in sparse:
        assert (kept_per_group(mask[name], 4) == 2).all(), name
    with pytest.raises(SpecError, match="prune.nm_indivisible: only structure nm uses it"):
        parse_spec(tiny_raw("prune_at_init", prune={"criterion": "snip", "schedule": "one_shot", "sparsity": 0.5,
                                                    "nm_indivisible": "dense"}))


def test_channel_groups_run_along_input_channels_at_each_kernel_position():
    """prune.nm_groups: channels (NVIDIA ASP's, SR-STE's order for a conv): the m consecutive input
    channels at one (kh, kw) form a group; a Linear's groups are its rows' either way."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 8, 3, 3, generator=g)
    ones = {"w": torch.ones(3, 8, 3, 3, dtype=torch.bool)}
    mask = select_nm({"w": scores}, ones, 2, 4, groups="channels")["w"]
    assert mask.shape == scores.shape and mask.is_contiguous()
    for o in range(3):
        for i in range(3):
            for j in range(3):
                for c in (0, 4):  # channels c..c+3 at (i, j): the 2 largest
                    group = scores[o, c:c + 4, i, j]
                    assert set(torch.topk(group, 2).indices.tolist()) == set(
                        mask[o, c:c + 4, i, j].nonzero().squeeze(1).tolist())
    rows = select_nm({"w": scores}, ones, 2, 4)["w"]
    assert not torch.equal(mask, rows) and int(mask.sum()) == int(rows.sum()) == scores.numel() // 2
    lin = torch.randn(5, 16, generator=g)
    same = [select_nm({"w": lin}, {"w": torch.ones(5, 16, dtype=torch.bool)}, 1, 4, groups=k)["w"]
            for k in ("rows", "channels")]
    assert torch.equal(*same)


def test_channel_groups_are_checked_keyed_and_kept_by_the_plan(tmp_path):
    # conv2 at width 1: its second conv has 32 input channels, its first 1 (left dense)
    raw = tiny_raw("prune_at_init", model={"name": "conv2"},
                   prune={**NM, "criterion": "magnitude", "schedule": "one_shot", "nm_groups": "channels",
                          "nm_indivisible": "dense"})
    spec = parse_spec(raw)
    plan = build_plan(spec)
    (rnd,) = [r for r in plan.rounds if r.mask is not None]
    assert rnd.mask.fields["nm_groups"] == "channels"
    rows_plan = build_plan(parse_spec(raw | {"prune": {**raw["prune"], "nm_groups": "rows"}}))
    (rows_rnd,) = [r for r in rows_plan.rounds if r.mask is not None]
    assert "nm_groups" not in rows_rnd.mask.fields and rows_rnd.mask.key != rnd.mask.key  # rows: the old key
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    mask = rt.store.load(refs[rnd.mask.key])["mask"]
    conv = mask["features.conv2.weight"]
    assert (conv.permute(0, 2, 3, 1).reshape(-1, 4).sum(1) == 2).all()
    assert mask["features.conv1.weight"].all()
    msg = refused(raw | {"prune": {**raw["prune"], "nm_indivisible": "error"}})
    assert msg.startswith("prune.m: features.conv1.weight has 1 input channels (in_features for a Linear; "
                          "prune.nm_groups: channels), not a multiple of m=4"), msg
    with pytest.raises(SpecError, match="prune.nm_groups: only structure nm uses it"):
        parse_spec(tiny_raw("prune_at_init", prune={"criterion": "snip", "schedule": "one_shot", "sparsity": 0.5,
                                                    "nm_groups": "channels"}))


@pytest.mark.parametrize("flow, extra, says", [
    ("dynamic_sparse", {"dynamic": {"method": "set", "update_interval": 5}},
     "prune.structure: dynamic_sparse cannot keep an N:M pattern"),
    ("early_bird", {"early_bird": {"structure": "unstructured", "window": 2}},
     "prune.structure: early_bird cannot keep an N:M pattern"),
])
def test_paradigms_that_move_or_draw_their_own_masks_refuse_nm_by_name(flow, extra, says):
    raw = tiny_raw(flow, prune={**NM, "schedule": "one_shot", "sparsity": 0.5}) | extra
    msg = refused(raw)
    assert msg.startswith(says) and msg.endswith("allowed: unstructured"), msg


def test_supermask_has_no_prune_section_to_put_nm_in():
    raw = tiny_raw("supermask") | {"selection": {"method": "edge_popup"}, "prune": {"structure": "nm"}}
    assert refused(raw).startswith("prune: unknown field")


def test_n_and_m_without_structure_nm_are_refused():
    assert refused(tiny_raw(prune={"n": 1})).startswith("prune.n: only structure nm uses it")
    assert refused(tiny_raw("prune_after_training", prune={"structure": "filter", "scope": "layerwise", "m": 8})) \
        .startswith("prune.m: only structure nm uses it (this one is filter)")
    assert parse_spec(tiny_raw(prune={"n": 2, "m": 4})).prune.structure == "unstructured"  # the defaults: a form's


def test_the_config_loads_and_its_refusals_come_through_load_spec():
    spec = load_spec(NM_CONFIG)
    assert (spec.prune.structure, spec.prune.n, spec.prune.m, spec.prune.sparsity) == ("nm", 2, 4, 0.5)
    assert spec.summary() == "final sparsity 0.5000"
    with pytest.raises(SpecError, match=r"^prune\.sparsity: structure nm keeps 2 of every 4"):
        load_spec(NM_CONFIG, ["prune.sparsity=0.95"])
    with pytest.raises(SpecError, match=r"^prune\.m: fc2\.weight has 300 input weights per row"):
        load_spec(NM_CONFIG, ["prune.m=8"])
    assert load_spec(NM_CONFIG, ["prune.n=1"]).prune.sparsity == 0.75  # derived again, not kept from 2:4
    sanity = tiny_raw("sanity_checks", prune={**NM, "sparsity": 0.9}, sanity={"base": "lottery_ticket"})
    assert refused(sanity).startswith("prune.sparsity: structure nm keeps 2 of every 4")


def test_synflow_nm_prunes_once_instead_of_its_100_rounds():
    raw = tiny_raw("prune_at_init")
    raw["prune"] = {"criterion": "synflow", "structure": "nm"}  # no schedule: SynFlow's default would be 100 rounds
    spec = parse_spec(raw)
    assert (spec.prune.schedule, spec.prune.rounds, spec.prune.sparsity) == ("one_shot", 1, 0.5)
    (mask,) = [r.mask for r in build_plan(spec).rounds if r.mask is not None]
    assert mask.stage == "mask" and mask.fields["structure"] == "nm"
    iterative = parse_spec(tiny_raw("prune_at_init", prune={**NM, "schedule": "iterative"}))
    (mask,) = [r.mask for r in build_plan(iterative).rounds if r.mask is not None]
    assert mask.stage == "mask" and mask.fields["structure"] == "nm"  # one round: the N:M mask stage


# ----------------------------------------------------------------- keys and listing

def keys(spec) -> dict:
    plan = build_plan(spec)
    return {(r.name, n.role): n.key for r, nodes in zip(plan.rounds, plan.nodes_by_round()) for n in nodes}


@pytest.mark.parametrize("path", ["configs/lth/lenet300_mnist.yaml", "configs/pat/lenet300_mnist.yaml",
                                  "configs/prune_at_init/snip_lenet300_mnist.yaml",
                                  "configs/pat/structured_lenet5_fashion.yaml"])
def test_structure_unstructured_keeps_every_key(path):
    before = keys(load_spec(ROOT / path))
    structure = "filter" if "structured" in path else "unstructured"
    after = keys(load_spec(ROOT / path, [f"prune.structure={structure}", "prune.n=2", "prune.m=4"]))
    assert after == before
    nodes = build_plan(load_spec(ROOT / path)).nodes
    assert all("n" not in node.fields and node.fields.get("structure") != "nm" for node in nodes)


def test_nm_shares_everything_before_the_mask_with_unstructured():
    nm, plain = keys(load_spec(NM_CONFIG)), keys(load_spec(SNIP_CONFIG))
    for k in (("dense", "init"), ("dense", "pretrain"), ("snip", "score")):
        assert nm[k] == plain[k]
    assert nm[("snip", "mask")] != plain[("snip", "mask")]
    assert keys(load_spec(NM_CONFIG, ["prune.n=1"]))[("snip", "mask")] != nm[("snip", "mask")]


def test_pai_list_names_the_structures():
    rows = {name: what for kind, name, what in catalog() if kind == "structure (prune.structure)"}
    assert set(rows) == {"unstructured", "nm", "filter"}
    assert "N:M" in rows["nm"] and math.isclose(load_spec(NM_CONFIG).prune.final_sparsity, 0.5)
