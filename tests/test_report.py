"""The report reads finished evaluate artifacts only: fake them straight into a store (no training)."""
from __future__ import annotations

import math

import pytest
from conftest import tiny_raw, tiny_spec

from pai_core.paradigms import build_plan
from pai_core.report import (accuracy_plot, aggregate, collect, layer_plot, markdown_table,
                             method_label, write_report)
from pai_core.spec_io import parse_spec
from pai_core.store import Store

PNG = b"\x89PNG\r\n\x1a\n"
SIZES = {"fc1.weight": 784 * 300, "fc2.weight": 300 * 100, "fc3.weight": 100 * 10}


def layers(density: float, shift: float = 0.0) -> dict:
    """A hand-made density report: the big first layer pruned hardest, as global magnitude does."""
    d = {"fc1.weight": density * (0.9 + shift), "fc2.weight": min(1.0, density * 2),
         "fc3.weight": min(1.0, density * 5)}
    rep = {n: {"kept": round(v * SIZES[n]), "total": SIZES[n], "density": v} for n, v in d.items()}
    kept, total = sum(r["kept"] for r in rep.values()), sum(SIZES.values())
    return rep | {"total": {"kept": kept, "total": total, "density": kept / total}}


def fake(store: Store, spec, round_name: str, test: float, val: float, density: float | None = None,
         shift: float = 0.0) -> None:
    rnd = next(r for r in build_plan(spec).rounds if r.name == round_name)
    d = rnd.density if density is None else density
    store.put("evaluate", rnd.evaluate.key, {}, info={
        "sparsity": 1 - d, "test_acc": test, "val_acc": val, "test_loss": 0.3, "val_loss": 0.3,
        "layers": layers(d, shift)})


def snip(sparsity: float, seed: int):
    prune = {"criterion": "snip", "schedule": "one_shot", "sparsity": sparsity, "rate": None, "rounds": 1}
    return tiny_spec("prune_at_init", name=f"snip{sparsity}", seed=seed, prune=prune)


def zhou(seed: int):
    raw = tiny_raw("supermask", name="zhou", seed=seed)
    raw.pop("prune")
    raw["selection"] = {"method": "supermask"}
    return parse_spec(raw)


@pytest.fixture
def results(tmp_path):
    """LTH (rate 0.2, 2 rounds) and SNIP at 90 % / 99 %, seeds 0 and 1; LTH seed 1 round 2 not run."""
    store = Store(tmp_path / "store")
    lth = [tiny_spec(name="lth", seed=s) for s in (0, 1)]
    snips = [snip(s, seed) for s in (0.9, 0.99) for seed in (0, 1)]
    fake(store, lth[0], "dense", 0.96, 0.95)
    fake(store, lth[1], "dense", 0.98, 0.97)
    fake(store, lth[0], "round 1", 0.90, 0.89)
    fake(store, lth[1], "round 1", 0.94, 0.91, density=0.8001, shift=0.02)  # measured ≠ planned (rounding)
    fake(store, lth[0], "round 2", 0.88, 0.86)
    for spec, acc in zip(snips, (0.85, 0.87, 0.50, 0.60)):
        fake(store, spec, "snip", acc, acc - 0.01)
    return lth + snips, store


def test_seeds_aggregate_by_hand(results):
    points, missing = collect(*results)
    groups = {(g.method, round(g.target, 4)): g for g in aggregate(points)}
    lth1 = groups[("LTH", 0.8)]
    assert lth1.seeds == (0, 1)
    assert lth1.test_mean == pytest.approx(0.92)
    assert lth1.test_std == pytest.approx(0.04 / math.sqrt(2))  # sample std of 0.90, 0.94
    assert lth1.val_mean == pytest.approx(0.90)
    assert lth1.target == pytest.approx(0.8) and lth1.density == pytest.approx(0.80005)  # grouped by plan
    assert lth1.layers["fc1.weight"] == pytest.approx((0.8 * 0.90 + 0.8001 * 0.92) / 2)
    assert groups[("LTH", 0.64)].seeds == (0,) and groups[("LTH", 0.64)].test_std == 0
    assert groups[("SNIP", 0.01)].test_mean == pytest.approx(0.55)
    # the dense round is one artifact shared by the LTH and SNIP specs: counted once per seed
    assert groups[("dense", 1.0)].seeds == (0, 1)
    assert groups[("dense", 1.0)].test_mean == pytest.approx(0.97)
    assert set(groups) == {("dense", 1.0), ("LTH", 0.8), ("LTH", 0.64), ("SNIP", 0.1), ("SNIP", 0.01)}
    assert missing == [("lth", 1, "round 2")]  # (spec name, seed, round name)


def test_markdown_table_rows_and_missing(results):
    table = markdown_table(*collect(*results))
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert rows == [
        "| dense | 0.0000 | 0, 1 | 97.00 ± 1.41 | 96.00 |",
        "| LTH | 0.2000 | 0, 1 | 92.00 ± 2.83 | 90.00 |",
        "| LTH | 0.3600 | 0 | 88.00 ± 0.00 | 86.00 |",
        "| SNIP | 0.9000 | 0, 1 | 86.00 ± 1.41 | 85.00 |",
        "| SNIP | 0.9900 | 0, 1 | 55.00 ± 7.07 | 54.00 |",
    ]
    assert table.rstrip().endswith("**Not computed yet (1):** lth (seed 1) round 2")


def test_accuracy_plot_axes(results, tmp_path):
    points, _ = collect(*results)
    fig = accuracy_plot(points, tmp_path / "acc.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis_inverted()  # sparsity grows to the right
    assert ax.get_xlabel() == "density (fraction of weights kept, log scale)"
    assert ax.get_ylabel() == "test accuracy (%)" and ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["dense 97.00 ± 1.41 %", "LTH", "SNIP"]
    lth = next(c for c in ax.containers if c.get_label() == "LTH")
    x, y = lth.lines[0].get_data()
    assert list(x) == pytest.approx([0.80005, 0.64]) and list(y) == pytest.approx([92.0, 88.0])  # at measured
    assert (tmp_path / "acc.png").read_bytes().startswith(PNG)


def test_layer_plot_one_axes_then_one_panel_per_sparsity(results):
    points, _ = collect(*results)
    fig = layer_plot(points)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fc1", "fc2", "fc3"]
    assert ax.get_yscale() == "log" and fig.get_supylabel() == "density (fraction kept, log scale)"
    assert len(ax.get_lines()) == 4  # LTH ×2 sparsities, SNIP ×2; dense is not drawn
    panels = [a for a in layer_plot(points, max_lines=2).axes if a.get_visible()]
    assert [a.get_title() for a in panels] == [
        "sparsity 0.2 · density 0.8", "sparsity 0.36 · density 0.64", "sparsity 0.9 · density 0.1",
        "sparsity 0.99 · density 0.01"]
    assert [len(a.get_lines()) for a in panels] == [1, 1, 1, 1]


def test_write_report_files(results, tmp_path):
    rep = write_report(*results, tmp_path / "out")
    for png in (rep.accuracy_png, rep.layers_png):
        data = png.read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    md = rep.markdown.read_text()
    assert "| LTH | 0.2000 | 0, 1 | 92.00 ± 2.83 | 90.00 |" in md
    assert "](accuracy.png)" in md and "](layers.png)" in md
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp file left


def test_empty_store_is_a_clear_error(tmp_path):
    specs = [tiny_spec(name="lth"), snip(0.9, 0)]
    with pytest.raises(ValueError, match="nothing to report: none of the 2 specs has a finished evaluate stage"):
        write_report(specs, Store(tmp_path), tmp_path / "out")


def test_only_dense_finished_still_reports(tmp_path):
    store, spec = Store(tmp_path), tiny_spec(name="lth")
    fake(store, spec, "dense", 0.97, 0.96)
    rep = write_report([spec], store, tmp_path / "out")
    assert [rnd for _, _, rnd in rep.missing] == ["round 1", "round 2"]
    assert rep.layers_png.read_bytes().startswith(PNG)


def test_learned_mask_groups_seeds_at_measured_density(tmp_path):
    store, specs = Store(tmp_path), [zhou(0), zhou(1)]
    fake(store, specs[0], "supermask", 0.80, 0.79, density=0.48)
    fake(store, specs[1], "supermask", 0.82, 0.81, density=0.52)
    points, _ = collect(specs, store)
    [g] = aggregate(points)
    assert g.seeds == (0, 1) and g.measured and g.target == pytest.approx(0.50)
    assert "| supermask | 0.5000 (measured) | 0, 1 | 81.00 ± 1.41 | 80.00 |" in markdown_table(points)


def test_method_labels():
    def labels(spec):
        return [method_label(spec, r) for r in build_plan(spec).rounds]
    assert labels(tiny_spec(prune={"reinit_control": True, "rounds": 1})) == ["dense", "LTH", "LTH reinit"]
    assert labels(tiny_spec("prune_after_training")) == ["dense"] + ["PaT magnitude (iterative)"] * 2
    assert labels(tiny_spec(prune={"rewind_iter": 5})) == ["dense", "LTH (rewind 5)", "LTH (rewind 5)"]
    assert labels(tiny_spec("sanity_checks", sanity={"base": "lottery_ticket"})) == \
        ["original", "reinit", "shuffle", "invert"]
    rigl = tiny_spec("dynamic_sparse", dynamic={"method": "rigl", "update_interval": 5}, prune={
        "criterion": "random", "schedule": "one_shot", "sparsity": 0.9, "rate": None, "rounds": 1, "scope": "erk"})
    assert labels(rigl) == ["dense", "RigL"]
    assert labels(snip(0.9, 0)) == ["dense", "SNIP"]


def test_specs_differing_beyond_seed_and_sparsity_are_not_averaged(tmp_path):
    store = Store(tmp_path)
    a, b = (tiny_spec("prune_after_training", name=name, retrain={"lr": lr})
            for name, lr in (("pat-a", 0.01), ("pat-b", 0.1)))
    fake(store, a, "dense", 0.97, 0.96)  # one pretrain for both: the same baseline, not a clash
    for spec, acc in ((a, 0.9), (b, 0.5)):
        fake(store, spec, "round 1", acc, acc)
    methods = [g.method for g in aggregate(collect([a, b], store)[0])]
    assert methods == ["dense", "PaT magnitude (iterative) [pat-a]", "PaT magnitude (iterative) [pat-b]"]
