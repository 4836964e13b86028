"""The report reads finished evaluate artifacts only: fake them straight into a store (no training)."""
from __future__ import annotations

import base64
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import tiny_raw, tiny_spec
from matplotlib.container import ErrorbarContainer

from pai_core.paradigms import build_plan
from pai_core.report import (Point, accuracy_plot, aggregate, collect, density_ticks, layer_plot, markdown_table,
                             method_label, write_report)
from pai_core.spec_io import SpecError, parse_spec
from pai_core.store import Store

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height in pixels, from the PNG's IHDR chunk."""
    return struct.unpack(">II", data[16:24])
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


def linear_flops(density: float, shift: float = 0.0) -> float:
    """`layers`' densities as a share of LeNet-300-100's FLOPs on 16×16 inputs, by hand: a Linear
    uses each weight once, so it is Σ density·size / Σ size over 256·300, 300·100, 100·10."""
    sizes = (256 * 300, 300 * 100, 100 * 10)
    d = (density * (0.9 + shift), min(1.0, density * 2), min(1.0, density * 5))
    return sum(a * b for a, b in zip(d, sizes)) / sum(sizes)


def test_markdown_table_rows_and_missing(results):
    table = markdown_table(*collect(*results))
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.rsplit(" | ", 1)[0] + " |" for r in rows] == [
        "| dense | 0.0000 | 2 | 97.00 ± 1.41 | 96.00 |",
        "| LTH | 0.2000 | 2 | 92.00 ± 2.83 | 90.00 |",
        "| LTH | 0.3600 | 1 | 88.00 | 86.00 |",  # one seed: no spread to show
        "| SNIP | 0.9000 | 2 | 86.00 ± 1.41 | 85.00 |",
        "| SNIP | 0.9900 | 2 | 55.00 ± 7.07 | 54.00 |",
    ]
    flops = [float(r.rsplit(" | ", 1)[1].strip(" |")) for r in rows]
    assert flops[0] == pytest.approx(100 * 100_120 / 107_800, abs=0.005)  # 0.9 of fc1, the rest whole: 92.88
    want = [linear_flops(1.0), (linear_flops(0.8) + linear_flops(0.8001, 0.02)) / 2, linear_flops(0.64),
            linear_flops(0.1), linear_flops(0.01)]
    assert flops == pytest.approx([round(100 * w, 2) for w in want], abs=0.006)
    assert table.startswith("| method | target sparsity | n seeds | test acc mean ± std (%) | val acc mean (%) | "
                            "FLOPs (% of dense) |")
    assert table.rstrip().endswith("**Not computed yet (1):** lth (seed 1) round 2")


def test_flops_share_counts_each_conv_weight_at_every_output_position():
    """conv2 on 1×16×16 inputs: two 3×3 convs at 16×16 positions (padding 1), a pool to 8×8, then
    three Linears; halving conv1 alone removes 64·9·256 of the multiply-adds, by hand."""
    from pai_core.flops import spec_share as flops_share
    spec = tiny_spec(model={"name": "conv2"})
    convs = {"conv1": 64 * 1 * 9 * 256, "conv2": 64 * 64 * 9 * 256}
    fcs = {"fc1": 64 * 8 * 8 * 256, "fc2": 256 * 256, "fc3": 256 * 10}
    dense = sum(convs.values()) + sum(fcs.values())
    names = {n: f"features.{n}.weight" if n.startswith("conv") else f"{n}.weight" for n in (*convs, *fcs)}
    assert flops_share(spec, {names["conv1"]: 0.5}) == pytest.approx((dense - convs["conv1"] / 2) / dense)
    assert flops_share(spec, {}) == 1.0


def test_accuracy_plot_axes(results, tmp_path):
    points, _ = collect(*results)
    fig = accuracy_plot(points, tmp_path / "acc.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis_inverted()  # sparsity grows to the right
    assert ax.get_xlabel() == "density (fraction of weights kept, log scale)"
    assert ax.get_ylabel() == "test accuracy (%)" and ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["dense 97.00 ± 1.41 %", "LTH", "SNIP"]
    lth = next(line for line in ax.get_lines() if line.get_label() == "LTH")
    x, y = lth.get_data()
    assert list(x) == pytest.approx([0.80005, 0.64]) and list(y) == pytest.approx([92.0, 88.0])  # at measured
    # Error bars only where there are two seeds: LTH at 0.8, both SNIP points; not LTH round 2 (seed 0 only).
    bars = {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}
    assert set(bars) == {"_LTH std", "_SNIP std"}
    [lth_bar] = bars["_LTH std"].lines[2]
    assert [seg[:, 0].tolist() for seg in lth_bar.get_segments()] == [pytest.approx([0.80005, 0.80005])]
    assert lth_bar.get_segments()[0][:, 1].tolist() == pytest.approx([92 - 2.828427, 92 + 2.828427])
    assert len(bars["_SNIP std"].lines[2][0].get_segments()) == 2
    assert len(ax.patches) == 1  # the dense baseline's ± std band (two seeds)
    # Ticks: the measured densities drawn, not 1-2-5; 0.64 is too close to 0.8 on this axis to get a label.
    ticks = [(round(t, 5), t_label.get_text()) for t, t_label in zip(ax.get_xticks(), ax.get_xticklabels())]
    assert ticks == [(0.80005, "0.8"), (0.1, "0.1"), (0.01, "0.01")]
    data = (tmp_path / "acc.png").read_bytes()
    assert data.startswith(PNG) and png_size(data) == (9.5 * 300, 5.5 * 300)  # 300 dpi


def test_flops_plot_draws_each_line_at_its_masks_flops(results):
    points, _ = collect(*results)
    fig = accuracy_plot(points, x="flops")
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("inference FLOPs") and ax.get_title().startswith("Test accuracy vs FLOPs")
    snip = next(line for line in ax.get_lines() if line.get_label() == "SNIP")
    assert list(snip.get_xdata()) == pytest.approx([linear_flops(0.1), linear_flops(0.01)])  # not the densities
    density = accuracy_plot(points).axes[0]
    assert list(next(l for l in density.get_lines() if l.get_label() == "SNIP").get_xdata()) == \
        pytest.approx([0.1, 0.01])


def test_accuracy_plot_one_seed_has_no_error_bars_nor_band(tmp_path):
    store, spec = Store(tmp_path), tiny_spec(name="lth")
    for rnd, acc in (("dense", 0.97), ("round 1", 0.95), ("round 2", 0.93)):
        fake(store, spec, rnd, acc, acc)
    ax = accuracy_plot(collect([spec], store)[0]).axes[0]
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)] and not ax.patches
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dense 97.00 %", "LTH"]
    [lth] = [line for line in ax.get_lines() if line.get_label() == "LTH"]
    assert list(lth.get_ydata()) == pytest.approx([95.0, 93.0]) and lth.get_marker() != "None"


def test_density_ticks_label_distinct_densities_thinned_on_a_log_axis():
    lth = [0.8 ** k for k in range(1, 20)] + [0.8] * 3  # 20 % per round, seeds repeat a density
    lo, hi, gap = min(lth) / 1.5, 1.15, 0.1
    ticks = density_ticks(lth, lo, hi, gap)
    assert ticks[0] == 0.8 and ticks == sorted(set(ticks), reverse=True) and set(ticks) <= set(lth)
    gaps = [math.log(a / b) for a, b in zip(ticks, ticks[1:])]
    assert min(gaps) > gap * math.log(hi / lo)  # no two labels overlap
    assert 5 <= len(ticks) < 19 and ticks[-1] < 0.8 ** 17  # thinned, but labelled along the whole axis
    assert density_ticks(lth, lo, hi, 0.0) == sorted(set(lth), reverse=True)  # room for all: all distinct ones
    # Densities far apart all keep their label, written compactly.
    assert [f"{d:.3g}" for d in density_ticks([0.8, 0.512, 0.107374, 0.014412], 0.0096, 1.15, 0.05)] == \
        ["0.8", "0.512", "0.107", "0.0144"]


def test_accuracy_plot_tick_labels_never_overlap(tmp_path):
    """Twenty LTH rounds: as many labels as the axes' width allows (a long legend narrows it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for method, most in (("LTH", 19), ("PaT magnitude (iterative) [a spec with a long name]", 8)):
        points = [Point("s", method, 0, f"r{k}", 0.8 ** k, 0.8 ** k, 0.9, 0.9, {}, "m on d") for k in range(1, 21)]
        fig = accuracy_plot(points)
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        boxes = sorted((t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels()), key=lambda b: b.x0)
        assert 4 <= len(boxes) <= most and boxes[0].x0 < boxes[-1].x0
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))
        assert fig.axes[0].get_xticklabels()[0].get_text() == "0.8"


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
    assert png_size(rep.accuracy_png.read_bytes()) == (2850, 1650)  # 300 dpi
    for pdf in (rep.accuracy_pdf, rep.layers_pdf):
        assert pdf.suffix == ".pdf" and pdf.read_bytes().startswith(b"%PDF")
    for svg in (rep.accuracy_svg, rep.layers_svg):
        assert svg.suffix == ".svg" and b"<svg" in svg.read_bytes()[:1000]
    assert sorted(p.name for p in rep.files) == sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "accuracy.pdf", "accuracy.png", "accuracy.svg", "flops.pdf", "flops.png", "flops.svg", "layers.pdf",
        "layers.png", "layers.svg", "report.md"]
    md = rep.markdown.read_text()
    assert "| LTH | 0.2000 | 2 | 92.00 ± 2.83 | 90.00 |" in md
    assert "](accuracy.png)" in md and "](layers.png)" in md and "](accuracy.pdf)" in md and "](layers.svg)" in md
    assert "](flops.png)" in md and "](flops.svg)" in md and rep.flops_png.read_bytes().startswith(PNG)
    again = write_report(*results, tmp_path / "again")
    assert again.accuracy_pdf.read_bytes() == rep.accuracy_pdf.read_bytes()  # no creation date: same bytes


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
    assert "| supermask | 0.5000 (measured) | 2 | 81.00 ± 1.41 | 80.00 |" in markdown_table(points)


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
    # the allocation when it is not one global ranking, and IMP's criterion when it is not magnitude
    one_shot = {"schedule": "one_shot", "sparsity": 0.9, "rate": None, "rounds": 1}
    assert labels(tiny_spec("prune_after_training", prune={**one_shot, "scope": "erk"})) == ["dense", "PaT magnitude (erk)"]
    assert labels(tiny_spec("prune_after_training", prune={**one_shot, "criterion": "lamp"}))[1] == "PaT LAMP"
    assert labels(tiny_spec(prune={"criterion": "lamp", "scope": "uniform_plus", "rounds": 1})) == \
        ["dense", "LTH (LAMP, uniform+)"]
    assert labels(snip(0.9, 0).model_copy(update={"prune": snip(0.9, 0).prune.model_copy(
        update={"scope": "layerwise"})}))[1] == "SNIP (layerwise)"


def test_specs_differing_beyond_seed_and_sparsity_are_not_averaged(tmp_path):
    store = Store(tmp_path)
    a, b = (tiny_spec("prune_after_training", name=name, retrain={"lr": lr})
            for name, lr in (("pat-a", 0.01), ("pat-b", 0.1)))
    fake(store, a, "dense", 0.97, 0.96)  # one pretrain for both: the same baseline, not a clash
    for spec, acc in ((a, 0.9), (b, 0.5)):
        fake(store, spec, "round 1", acc, acc)
    methods = [g.method for g in aggregate(collect([a, b], store)[0])]
    assert methods == ["dense", "PaT magnitude (iterative) [pat-a]", "PaT magnitude (iterative) [pat-b]"]


def test_a_sweep_points_seed_and_sparsity_are_not_part_of_its_disambiguating_name(tmp_path):
    """Sweep points are named base[grid tags]: a seed or rate tag would name one point of a line
    of several; the other tags tell lines apart and stay."""
    store = Store(tmp_path)
    specs = [tiny_spec("prune_after_training", name=f"{base}[{tag}rate={rate},seed={seed}]", seed=seed,
                       retrain={"lr": lr}, prune={"rate": rate})
             for base, tag, lr in (("pat", "lr=0.01,", 0.01), ("pat", "lr=0.1,", 0.1))
             for rate in (0.2, 0.5) for seed in (0, 1)]
    for spec in specs:
        fake(store, spec, "dense", 0.97, 0.96)
        fake(store, spec, "round 1", 0.9, 0.9)
    groups = aggregate(collect(specs, store)[0])
    assert len(groups) == 5 and all(g.seeds == (0, 1) for g in groups)  # dense, then 2 lines x 2 rates
    methods = list(dict.fromkeys(g.method for g in groups))
    assert methods == ["dense", "PaT magnitude (iterative) [pat[lr=0.01]]", "PaT magnitude (iterative) [pat[lr=0.1]]"]


def reinit_pair(tmp_path):
    """An LTH round and its reinit control: one mask, so identical per-layer densities; and here
    identical accuracies too, as happens when both collapse to chance."""
    store, spec = Store(tmp_path), tiny_spec(name="lth", prune={"reinit_control": True, "rounds": 1})
    for rnd in ("dense", "round 1", "round 1 reinit"):
        fake(store, spec, rnd, 0.9, 0.9)
    return collect([spec], store)[0]


@pytest.mark.parametrize("plot", [accuracy_plot, layer_plot])
def test_coinciding_series_stay_distinguishable(plot, tmp_path):
    lines = {line.get_label().split(",")[0]: line for line in plot(reinit_pair(tmp_path)).axes[0].get_lines()
             if line.get_label().startswith("LTH")}  # layers: "LTH reinit, sparsity 0.2 · density 0.8"
    a, b = lines.pop("LTH"), lines.pop("LTH reinit")
    assert not lines
    assert list(a.get_ydata()) == pytest.approx(list(b.get_ydata()))  # drawn on top of each other...
    assert a.get_linestyle() != b.get_linestyle() and a.get_marker() != b.get_marker()  # ...yet both visible
    assert a.get_color() != b.get_color()
    assert (a.get_markerfacecolor(), a.get_markersize()) != (b.get_markerfacecolor(), b.get_markersize())


def test_specs_of_a_paradigm_flow_run_and_of_a_sweep_run():
    from flows.report import specs_of_flow_run

    spec = tiny_spec(name="lth", prune={"rate": 0.5})
    params = {"spec": spec.model_dump(mode="json")}  # as the Prefect API returns parameters: JSON
    assert specs_of_flow_run(SimpleNamespace(parameters=params, name="gentle-fox")) == ([spec], "lth")
    sweep = {"name": "criteria", "base": [tiny_raw()], "grid": {"seed": [0, 1], "prune.rate": [0.2, 0.5]},
             "dask": {"workers": 2}}
    specs, name = specs_of_flow_run(SimpleNamespace(parameters={"sweep": sweep, "sequential": False}, name="x"))
    assert name == "criteria" and len(specs) == 4
    assert sorted((s.seed, s.prune.rate) for s in specs) == [(0, 0.2), (0, 0.5), (1, 0.2), (1, 0.5)]


def test_flow_runs_without_spec_or_sweep_or_with_a_bad_one_are_clear_errors():
    from flows.report import specs_of_flow_run

    report_run = SimpleNamespace(parameters={"specs": [], "name": "r"}, name="calm-owl")
    with pytest.raises(SpecError, match=r"flow run 'calm-owl' has neither a `spec` nor a `sweep` parameter "
                                        r"\(it has: specs, name\)"):
        specs_of_flow_run(report_run)
    bad = SimpleNamespace(parameters={"spec": tiny_raw(train={"epochs": -1})}, name="bad-run")
    with pytest.raises(SpecError, match=r"flow run 'bad-run': spec: .*epochs"):
        specs_of_flow_run(bad)
    with pytest.raises(SpecError, match=r"flow run 'w': sweep: .*base"):
        specs_of_flow_run(SimpleNamespace(parameters={"sweep": {"grid": {}}}, name="w"))


def test_publish_logs_every_file_to_mlflow_and_the_pngs_to_prefect(results, pai_home, monkeypatch):
    """MLflow's client and Prefect's artifact calls replaced by recorders: what goes where."""
    import flows.report as pub

    logged, images = [], {}

    class Client:
        def create_run(self, experiment, run_name, tags):
            return SimpleNamespace(info=SimpleNamespace(run_id="run-1"))

        def log_artifact(self, run_id, path, artifact_path):
            logged.append((run_id, artifact_path, path))

        def set_terminated(self, run_id):
            pass

    monkeypatch.setattr(pub, "mlflow_client", Client)
    monkeypatch.setattr(pub, "experiment_id", lambda client, name: "1")
    monkeypatch.setattr(pub, "mlflow_run_url", lambda run_id: None)
    monkeypatch.setattr(pub, "create_markdown_artifact", lambda text, key, description: None)
    monkeypatch.setattr(pub, "create_image_artifact", lambda url, key, description: images.setdefault(key, url))
    out = pub.publish_report(*results, "tiny lth")
    names = ["accuracy.png", "accuracy.pdf", "accuracy.svg", "layers.png", "layers.pdf", "layers.svg", "flops.png",
             "flops.pdf", "flops.svg", "report.md"]
    assert [(run, where, Path(p).name) for run, where, p in logged] == [("run-1", "report", n) for n in names]
    for plot in ("accuracy", "layers", "flops"):
        for ext in ("png", "pdf", "svg"):
            assert Path(out[f"{plot}_{ext}"]) == pai_home / "reports" / "tiny-lth" / f"{plot}.{ext}"
        url = images[f"pai-report-tiny-lth-{plot}"]
        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.split(",", 1)[1]) == Path(out[f"{plot}_png"]).read_bytes()
    assert out["markdown"].endswith("report.md") and out["mlflow_run_id"] == "run-1"
