"""pai_core.mask_compare and `pai masks`: every number of a comparison by hand, the chance level
against random masks drawn many times, round masks read from a real store (IMP's round 2 is a
subset of round 1; a mask against itself), and the CLI's one-line refusals before any compute."""
from __future__ import annotations

import csv
import math
import re

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import tiny_raw
from flows.cli import app
from pai_core import mask_compare as mc
from pai_core.paradigms import build_plan
from pai_core.spec_io import load_spec, parse_spec
from pai_core.stages.registry import Runtime, run_plan
from pai_core.store import Store


def _mask(bits: str, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor([b == "1" for b in bits]).reshape(shape)


def test_compare_every_number_by_hand():
    # layer a (8 weights): A keeps {0, 1, 2, 4}, B keeps {2, 5, 6}; layer b (5): A {0, 1}, B {0, 1, 2}
    a = {"a": _mask("11101000", (2, 4)), "b": _mask("11000", (5,))}
    b = {"a": _mask("00100110", (2, 4)), "b": _mask("11100", (5,))}
    c = mc.compare(a, b)
    la, lb, t = *c.layers, c.total
    assert [o.layer for o in c.layers] == ["a", "b"] and t.layer == "total"
    assert (la.size, la.kept_a, la.kept_b, la.both) == (8, 4, 3, 1)
    assert (lb.size, lb.kept_a, lb.kept_b, lb.both) == (5, 2, 3, 2)
    assert (t.size, t.kept_a, t.kept_b, t.both) == (13, 6, 6, 3)
    # layer a: union 4 + 3 - 1 = 6; chance μ = 4·3/8 = 1.5, Jaccard 1.5 / (7 - 1.5) = 3/11;
    # σ² = 4·3·4·5 / (8²·7) = 15/28
    assert la.density_a == 0.5 and la.density_b == 3 / 8
    assert la.jaccard == pytest.approx(1 / 6) and la.overlap_a == 0.25 and la.overlap_b == pytest.approx(1 / 3)
    assert la.chance_both == 1.5 and la.chance_jaccard == pytest.approx(3 / 11)
    assert la.chance_overlap_a == pytest.approx(3 / 8) and la.chance_overlap_b == 0.5
    assert la.ratio == pytest.approx((1 / 6) / (3 / 11)) and la.z == pytest.approx(-0.5 / math.sqrt(15 / 28))
    # layer b: A ⊆ B; union 3; μ = 2·3/5 = 1.2, chance Jaccard 1.2 / 3.8 = 6/19; σ² = 2·3·3·2 / (25·4) = 0.36
    assert lb.jaccard == pytest.approx(2 / 3) and lb.overlap_a == 1.0 and lb.overlap_b == pytest.approx(2 / 3)
    assert lb.chance_both == pytest.approx(1.2) and lb.chance_jaccard == pytest.approx(6 / 19)
    assert lb.ratio == pytest.approx(19 / 9) and lb.z == pytest.approx(0.8 / 0.6)
    # total: counts and μ, σ² summed per layer: μ = 2.7, chance Jaccard 2.7 / (12 - 2.7) = 9/31
    assert t.density_a == t.density_b == pytest.approx(6 / 13)
    assert t.jaccard == pytest.approx(1 / 3) and t.overlap_a == t.overlap_b == 0.5
    assert t.chance_both == pytest.approx(2.7) and t.chance_jaccard == pytest.approx(9 / 31)
    assert t.chance_overlap_a == pytest.approx(2.7 / 6) and t.ratio == pytest.approx(31 / 27)
    assert t.z == pytest.approx(0.3 / math.sqrt(15 / 28 + 0.36))
    # symmetric in what it should be, swapped in what is directional
    r = mc.compare(b, a).total
    assert (r.jaccard, r.chance_jaccard, r.overlap_a, r.overlap_b) == (t.jaccard, t.chance_jaccard,
                                                                        t.overlap_b, t.overlap_a)


def test_a_mask_against_itself_and_empty_or_dense_layers():
    a = {"w": _mask("1100", (4,)), "empty": _mask("000", (3,)), "dense": _mask("11", (2,))}
    c = mc.compare(a, a)
    w, empty, dense = c.layers
    assert w.jaccard == 1.0 and w.chance_jaccard == pytest.approx(1 / 3) and w.ratio == pytest.approx(3.0)
    assert math.isnan(empty.jaccard) and math.isnan(empty.overlap_a) and math.isnan(empty.ratio)  # 0/0
    assert dense.jaccard == dense.chance_jaccard == dense.ratio == 1.0 and math.isnan(dense.z)  # σ = 0
    assert c.total.jaccard == 1.0 and c.total.both == 4


@pytest.mark.parametrize("b, message", [
    ({"x": torch.ones(2, 3, dtype=torch.bool), "y": torch.ones(4, dtype=torch.bool)},
     "masks of different models: layer 'x' is [2, 2] in A, [2, 3] in B"),
    ({"y": torch.ones(4, dtype=torch.bool)}, "masks of different models: layer 'x' [2, 2] is in A, not in B"),
    ({"x": torch.ones(2, 2, dtype=torch.bool), "y": torch.ones(4, dtype=torch.bool),
      "z": torch.ones(1, dtype=torch.bool)}, "masks of different models: layer 'z' [1] is in B, not in A"),
])
def test_masks_of_different_models_are_refused_naming_the_first_layer(b, message):
    a = {"x": torch.ones(2, 2, dtype=torch.bool), "y": torch.ones(4, dtype=torch.bool)}
    with pytest.raises(mc.MaskRefused) as e:
        mc.compare(a, b)
    assert str(e.value) == message
    with pytest.raises(mc.MaskRefused):
        mc.matrix([a, a, b])


def _random(counts: list[tuple[int, int]], g: torch.Generator) -> dict[str, torch.Tensor]:
    """A mask keeping exactly k of n weights per layer, uniformly at random."""
    out = {}
    for i, (n, k) in enumerate(counts):
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=g)[:k]] = True
        out[f"l{i}"] = m
    return out


def test_the_chance_level_is_what_random_masks_of_these_counts_give():
    g = torch.Generator().manual_seed(0)
    pairs = [mc.compare(_random([(1000, 300)], g), _random([(1000, 500)], g)).total for _ in range(2000)]
    formula = pairs[0].chance_jaccard
    assert formula == pytest.approx(150 / 650)  # μ = 300·500/1000, by hand
    mean_j = sum(p.jaccard for p in pairs) / len(pairs)
    mean_both = sum(p.both for p in pairs) / len(pairs)
    # sd of one Jaccard ≈ 0.014, of the mean of 2000 ≈ 3e-4; the plug-in's bias ≈ 1.5e-4
    assert mean_j == pytest.approx(formula, abs=1.5e-3)
    assert mean_both == pytest.approx(150, abs=1.0)
    zs = torch.tensor([p.z for p in pairs])
    assert abs(float(zs.mean())) < 0.1 and float(zs.std()) == pytest.approx(1.0, abs=0.1)  # σ is right too
    assert sum(p.ratio for p in pairs) / len(pairs) == pytest.approx(1.0, abs=0.01)


def test_the_total_chance_keeps_each_layers_count():
    """A dense-ish small layer beside a sparse large one: a global random mask at the total
    density would share far fewer weights (μ = 100·100/1000 = 10) than masks that keep each
    layer's count (μ = 90·90/100 + 10·10/900 ≈ 81.1), and the formula must be the latter."""
    g = torch.Generator().manual_seed(1)
    counts = [(100, 90), (900, 10)]
    pairs = [mc.compare(_random(counts, g), _random(counts, g)).total for _ in range(500)]
    mu = 81 + 100 / 900
    assert pairs[0].chance_both == pytest.approx(mu)
    assert pairs[0].chance_jaccard == pytest.approx(mu / (200 - mu))
    assert sum(p.both for p in pairs) / len(pairs) == pytest.approx(mu, abs=0.3)
    assert sum(p.jaccard for p in pairs) / len(pairs) == pytest.approx(mu / (200 - mu), abs=5e-3)


def test_matrix_is_the_pairwise_total_jaccard():
    g = torch.Generator().manual_seed(2)
    masks = [_random([(50, 20), (30, 10)], g) for _ in range(3)]
    m = mc.matrix(masks)
    for i in range(3):
        assert m.jaccard[i][i] == 1.0
        for j in range(3):
            c = mc.compare(masks[i], masks[j]).total
            assert m.jaccard[i][j] == m.jaccard[j][i] == pytest.approx(c.jaccard)
            assert m.chance[i][j] == pytest.approx(c.chance_jaccard)
    both = int(sum((masks[0][n] & masks[2][n]).sum() for n in masks[0]))
    union = int(sum((masks[0][n] | masks[2][n]).sum() for n in masks[0]))
    assert m.jaccard[0][2] == pytest.approx(both / union)
    assert set(m.pairs) == {(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)}


def test_align_gives_a_bias_one_round_masks_all_ones_in_the_other():
    w = torch.tensor([True, False])
    shapes = {"w": (2,), "b": (3,)}
    r1 = mc.RoundMask("s", 1, "r", {"w": w, "b": torch.tensor([True, False, False])}, shapes, "mask node", True, {})
    r2 = mc.RoundMask("s", 1, "r", {"w": w}, shapes, "mask node", True, {})
    a, b = mc.align([r1, r2])
    assert torch.equal(b["b"], torch.ones(3, dtype=torch.bool)) and torch.equal(b["w"], w) and a == r1.mask
    assert mc.compare(a, b).layers[1].overlap_a == 1.0


def test_existing_config_keeps_its_stage_keys():
    # computed before pai masks existed: it adds no field to any spec, so no key may move
    plan = build_plan(load_spec("configs/lth/lenet300_mnist.yaml", []))
    assert {r.name: (r.mask.key if r.mask else None, r.evaluate.key) for r in plan.rounds} == {
        "dense": (None, "66935315e63a2a082f22"),
        "round 1": ("69d98d67b4c09565a055", "3aa1ea7b6a5577e58da5"),
        "round 1 reinit": ("69d98d67b4c09565a055", "17b6f33f851f190baf07"),
        "round 2": ("6e2fe7484e6cf1fc91f0", "4fe412ae547f754baab1"),
        "round 2 reinit": ("6e2fe7484e6cf1fc91f0", "2118dabe20a6c45be6df"),
        "round 3": ("964b98bcf858eafea6e4", "fd76fb0e8ba1f9b6bc6d"),
        "round 3 reinit": ("964b98bcf858eafea6e4", "e17984431385ef727046")}


# --------------------------------------------------------------------- from a real store


@pytest.fixture
def lth_two_rounds(pai_home, tmp_path):
    """A tiny LTH spec (20 % per round, 2 rounds) run in process; its YAML path and store."""
    raw = tiny_raw(train={"epochs": 1})
    spec = parse_spec(raw)
    store = Store(pai_home / "store")
    run_plan(build_plan(spec).nodes, Runtime(store, "cpu"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, store


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_imp_round_two_is_a_subset_of_round_one_and_a_round_equals_itself(lth_two_rounds, tmp_path, monkeypatch):
    path, store = lth_two_rounds
    spec = load_spec(path, [])
    r1, r2 = mc.load_round_mask(spec, 1, store), mc.load_round_mask(spec, "round-2", store)
    assert (r1.name, r2.name, r1.source, r2.source, r2.trained) == ("round 1", "round 2", "mask node",
                                                                    "mask node", True)
    stored = store.load(store.get("mask", build_plan(spec).rounds[2].mask.key))["mask"]
    assert r2.mask.keys() == stored.keys() and all(torch.equal(r2.mask[n], stored[n].bool()) for n in stored)
    n = sum(m.numel() for m in r1.mask.values())
    assert n == 256 * 300 + 300 * 100 + 100 * 10  # synthetic inputs are 16 x 16
    c = mc.compare(r2.mask, r1.mask)
    assert (c.total.kept_b, c.total.kept_a) == (round(n * 0.8), round(n * 0.64)) == (86_240, 68_992)
    assert all(o.overlap_a == 1.0 for o in [*c.layers, c.total])  # IMP only removes
    assert c.total.jaccard == 68_992 / 86_240 and c.total.both == 68_992
    assert mc.compare(r1.mask, r1.mask).total.jaccard == 1.0

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["masks", f"{path}@2", f"{path}@round-1", "-o", "out"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "A = tiny@round 2, B = tiny@round 1" in res.output
    rows = _csv(tmp_path / "out" / "masks.csv")
    assert [r["layer"] for r in rows] == ["fc1.weight", "fc2.weight", "fc3.weight", "total"]
    for r, o in zip(rows, [*c.layers, c.total], strict=True):
        assert float(r["overlap_a"]) == 1.0 and int(r["both"]) == int(r["kept_a"]) == o.kept_a
        assert float(r["chance_both"]) == pytest.approx(int(r["kept_a"]) * int(r["kept_b"]) / int(r["size"])
                                                        if r["layer"] != "total" else o.chance_both)
    total = rows[-1]
    cells = [f"{float(total[k]):.4f}" for k in ("density_a", "density_b", "jaccard", "chance_jaccard")]
    assert re.search(r"total\s+" + r"\s+".join(map(re.escape, cells)), res.output), res.output
    matrix = _csv(tmp_path / "out" / "matrix.csv")
    assert float(matrix[0]["tiny@round 1"]) == pytest.approx(68_992 / 86_240)
    assert (tmp_path / "out" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"

    # the last round by default, the same mask twice: Jaccard 1; three masks: the matrix
    res = CliRunner().invoke(app, ["masks", str(path), f"{path}@2", f"{path}@1", "-o", "three"],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "1 = tiny@round 2 #1" in res.output and "2 = tiny@round 2 #2" in res.output
    matrix = _csv(tmp_path / "three" / "matrix.csv")
    assert float(matrix[0]["tiny@round 2 #2"]) == 1.0
    assert len(_csv(tmp_path / "three" / "masks.csv")) == 3 * 4  # 3 pairs, 3 layers + total each


def _upstream(node, out=None):
    """`node` and everything it needs, upstream first."""
    out = [] if out is None else out
    for dep in node.inputs.values():
        _upstream(dep, out)
    if node not in out:
        out.append(node)
    return out


def test_a_static_mask_counts_once_stored_a_moving_one_only_after_training(pai_home):
    """A pruning-at-init mask is final when its mask node is stored; a dynamic-sparse round's
    final mask is in its training payload, so its start mask alone is refused."""
    store = Store(pai_home / "store")
    rt = Runtime(store, "cpu")
    pai = parse_spec(tiny_raw("prune_at_init", prune={"criterion": "magnitude", "schedule": "one_shot",
                                                       "sparsity": 0.9, "rate": None, "rounds": 1}))
    rnd = build_plan(pai).rounds[-1]
    run_plan(_upstream(rnd.mask), rt)  # init, score and mask only: no training
    r = mc.load_round_mask(pai, None, store)
    assert (r.source, r.trained) == ("mask node", False)
    assert r.density == pytest.approx(0.1, abs=1e-5)

    dyn = parse_spec(tiny_raw("dynamic_sparse", dynamic={"method": "set", "update_interval": 5},
                              prune={"criterion": "random", "schedule": "one_shot", "sparsity": 0.9, "rate": None,
                                     "rounds": 1, "scope": "erk"}))
    rnd = build_plan(dyn).rounds[-1]
    run_plan(_upstream(rnd.mask), rt)
    with pytest.raises(mc.MaskRefused, match=rf"round 'set' of tiny is not stored yet \(train {rnd.trained.key[:12]}\)"):
        mc.load_round_mask(dyn, None, store)
    run_plan(build_plan(dyn).nodes, rt)
    r = mc.load_round_mask(dyn, None, store)
    final = store.load(store.get("train", rnd.trained.key))["mask"]
    start = store.load(store.get("mask", rnd.mask.key))["mask"]
    assert (r.source, r.trained) == ("training payload", True)
    assert all(torch.equal(r.mask[n], final[n].bool()) for n in final)
    assert any(not torch.equal(final[n], start[n]) for n in final)  # it did move


def test_pai_masks_refuses_in_one_line(lth_two_rounds, tmp_path, monkeypatch):
    path, _ = lth_two_rounds
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "base": tiny_raw(), "grid": {"seed": [0, 1]}}))
    before_store = [
        ([f"{path}@1"], "give at least two masks (SPEC[@ROUND]); got 1"),
        ([f"{path}@1", f"{path}@2", "3:seed=1"], "3:seed=1: there is no mask 3; masks: 1..2"),
        ([f"{path}@1", "nope.yaml"], "nope.yaml: no such spec file (SPEC[@ROUND]), nor an override"),
        ([f"{path}@1", f"{path}@"], "no round after '@'"),
        ([f"{path}@1", str(sweep)], "a sweep YAML; give experiment specs"),
        ([f"{path}@1", f"{path}@1", "prune.rate=1.5"], "prune.rate: Input should be less than 1"),
        ([f"{path}@1", f"{path}@1", "2:model.name=lenet5"],
         "masks of different models: layer 'fc1.weight' is [300, 256] in mask 1, [500, 50] in mask 2"),  # 16 x 16 inputs
    ]
    after_plan = [
        ([f"{path}@7", f"{path}@1"], "mask 1 (tiny@7): no round 7 in this plan; rounds: 0 'dense', 1 'round 1', "
                                     "2 'round 2'"),
        ([f"{path}@1", f"{path}@dense"], "mask 2 (tiny@dense): round 'dense' of tiny is dense (no mask); "
                                         "pruned rounds: 1 'round 1', 2 'round 2'"),
        ([f"{path}@1", f"{path}@1", "prune.rate=0.5"], "mask 1 (tiny@1): round 'round 1' of tiny is not stored yet"),
        ([f"{path}@1", f"{path}@1", "2:seed=1"], "mask 2 (tiny@1): round 'round 1' of tiny is not stored yet"),
    ]
    real, real_matrix = mc.load_round_mask, mc.matrix
    monkeypatch.setattr(mc, "load_round_mask", lambda *a, **k: pytest.fail("read the store"))
    for i, (args, message) in enumerate(before_store + after_plan):
        if i == len(before_store):
            monkeypatch.setattr(mc, "load_round_mask", real)
            monkeypatch.setattr(mc, "matrix", lambda *a, **k: pytest.fail("compared"))
        res = CliRunner().invoke(app, ["masks", *args], env={"COLUMNS": "250"})
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output and len(res.output.strip().splitlines()) == 1, (args, res.output)
    # N:FIELD=VALUE reaches the N-th mask only, and its label says so
    monkeypatch.setattr(mc, "matrix", real_matrix)
    res = CliRunner().invoke(app, ["masks", f"{path}@1", f"{path}@1", "1:seed=0"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("A = tiny@round 1 [seed=0]: ") and lines[1].startswith("B = tiny@round 1: ")
    assert re.search(r"total\s+0\.8000\s+0\.8000\s+1\.0000\s", res.output)  # the same mask
