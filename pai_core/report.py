"""Reports: accuracy-vs-density and per-layer-density plots plus a markdown table, from the store.

Pure reading: it never computes, so it works on partial results and says what is missing.
Figures are matplotlib `Figure`s drawn by the Agg canvas: no pyplot state, no display needed."""
from __future__ import annotations

import io
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from pai_core.paradigms import ExperimentSpec, build_plan, get_paradigm
from pai_core.plan import Round
from pai_core.store import Store, atomic_write

DENSE = "dense"  # the baseline's label; "dense [spec]" where a report spans several baselines
# Fields that only move a method along the density axis (a sweep), not onto another line.
_SWEEP = {"seed": True, "name": True, "experiment": True, "device": True, "tracking": True,
          "prune": {"sparsity", "rate", "rounds"}, "selection": {"keep"}, "sanity": {"round"}}


@dataclass(frozen=True)
class Point:
    """One finished (spec, round): `target` is the planned density, `density` the measured one."""
    spec: str
    method: str
    seed: int
    round: str
    target: float
    density: float
    test_acc: float
    val_acc: float
    layers: dict[str, float]
    setting: str  # "model on dataset", for titles


@dataclass(frozen=True)
class Group:
    """A method at one target density, aggregated over seeds (sample std; 0 for one seed)."""
    method: str
    target: float   # planned density; for a learned mask (supermask) the measured mean
    measured: bool  # True when `target` is that measured mean
    density: float  # measured mean: where the point is drawn
    seeds: tuple[int, ...]
    test_mean: float
    test_std: float
    val_mean: float
    layers: dict[str, float]


@dataclass(frozen=True)
class Report:
    accuracy_png: Path
    layers_png: Path
    markdown: Path
    points: list[Point]
    missing: list[tuple[str, int, str]]  # (spec name, seed, round name)


def method_label(spec: ExperimentSpec, rnd: Round) -> str:
    """What a researcher compares: the criterion / method, not the spec's file name."""
    if rnd.index == 0 and rnd.mask is None and rnd.name == DENSE:
        return DENSE
    return get_paradigm(spec.flow).label(spec, rnd)


def _identity(spec: ExperimentSpec, label: str) -> str:  # a dense baseline is its pretrain: model, data, train
    return spec.model_dump_json(include={"model", "data", "train"} if label == DENSE else None,
                                exclude=None if label == DENSE else _SWEEP)


def collect(specs: list[ExperimentSpec], store: Store) -> tuple[list[Point], list[tuple[str, int, str]]]:
    """Every finished round as a Point, and every planned round not stored yet.

    Specs differing only by seed or swept sparsity share a method line; two sharing a label but
    differing otherwise (another lr) get their spec name appended rather than being averaged."""
    rows = [(s, r, method_label(s, r)) for s in specs for r in build_plan(s).rounds]
    owners: dict[str, dict[str, str]] = defaultdict(dict)  # label -> identity -> first spec name
    for s, _, label in rows:
        owners[label].setdefault(_identity(s, label), s.name)
    unique: dict[tuple[str, str], tuple[ExperimentSpec, Round]] = {}  # a shared artifact (dense) counts once
    for s, r, label in rows:
        if len(owners[label]) > 1:
            label = f"{label} [{owners[label][_identity(s, label)]}]"
        unique.setdefault((label, r.evaluate.key), (s, r))
    points, missing = [], []
    for (label, key), (s, r) in unique.items():
        if (ref := store.get("evaluate", key)) is None:
            missing.append((s.name, s.seed, r.name))
            continue
        i = ref.info
        layers = {n: float(v["density"]) for n, v in i.layers.items() if n != "total"}
        points.append(Point(s.name, label, s.seed, r.name, r.density, 1 - i.sparsity, i.test_acc,
                            i.val_acc, layers, f"{s.model.name} on {s.data.dataset}"))
    return points, missing


def aggregate(points: list[Point]) -> list[Group]:
    """Mean ± std over seeds per (method, *planned* density, to 1e-9), so seeds line up exactly.

    A learned mask has none (NaN): grouped by round, drawn at its mean measured density."""
    by: dict[tuple[str, float | str], list[Point]] = defaultdict(list)
    for p in points:
        by[(p.method, p.round if math.isnan(p.target) else round(p.target, 9))].append(p)
    groups = []
    for (method, _), ps in by.items():
        test, learned = [p.test_acc for p in ps], math.isnan(ps[0].target)
        density = statistics.fmean(p.density for p in ps)
        groups.append(Group(method, density if learned else ps[0].target, learned, density,
                            tuple(sorted(p.seed for p in ps)), statistics.fmean(test),
                            statistics.stdev(test) if len(test) > 1 else 0.0, statistics.fmean(p.val_acc for p in ps),
                            {n: statistics.fmean(p.layers[n] for p in ps if n in p.layers)
                             for n in dict.fromkeys(n for p in ps for n in p.layers)}))
    return sorted(groups, key=lambda g: (not g.method.startswith(DENSE), g.method.casefold(), -g.target))


def _title(points: list[Point], what: str) -> str:
    return f"{what}: {', '.join(sorted({p.setting for p in points}))}"


def _styles(keys: list) -> dict:
    """A color and a marker per method (or per line), the same in both plots and every panel."""
    keys, cmap = list(dict.fromkeys(keys)), colormaps["tab10" if len(set(keys)) <= 10 else "tab20"]
    return {k: (cmap(i % cmap.N), "osD^vP*Xph"[i % 10]) for i, k in enumerate(keys)}


def _log_ticks(axis) -> None:  # plain 1-2-5 numbers (0.5, 0.2, 0.1) read easier than powers of ten
    axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def accuracy_plot(points: list[Point], path: str | Path | None = None) -> Figure:
    """Test accuracy vs density, one line per method (error bars: std over seeds), dense dashed.

    The log-density axis is inverted so sparsity grows to the right, as in the survey's plots."""
    groups = aggregate(points)
    fig = Figure(figsize=(9.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for g in (g for g in groups if g.method.startswith(DENSE)):
        std, acc = f" ± {100 * g.test_std:.2f}" if g.test_std else "", 100 * g.test_mean
        ax.axhline(acc, color="0.3", ls="--", lw=1.2, label=f"{g.method} {acc:.2f}{std} %")
        ax.axhspan(acc - 100 * g.test_std, acc + 100 * g.test_std, color="0.3", alpha=0.08)
    for method, (color, marker) in _styles([g.method for g in groups if not g.method.startswith(DENSE)]).items():
        gs = sorted((g for g in groups if g.method == method), key=lambda g: -g.density)
        ax.errorbar([g.density for g in gs], [100 * g.test_mean for g in gs], yerr=[100 * g.test_std for g in gs],
                    marker=marker, ms=5, capsize=3, color=color, label=method)
    xs = [g.density for g in groups if not g.method.startswith(DENSE)] or [1.0]
    ax.set(xscale="log", xlabel="density (fraction of weights kept, log scale)", ylabel="test accuracy (%)",
           title=_title(points, "Test accuracy vs density"))
    ax.set_xlim(1.15, min(min(xs) / 1.5, 0.5))  # inverted: dense at the left, sparsest at the right
    _log_ticks(ax.xaxis)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # beside the data, never on it
    return _save(fig, path)


def layer_plot(points: list[Point], path: str | Path | None = None, max_lines: int = 8) -> Figure:
    """Per-layer density (log scale) in network order: where each method puts its weights.

    Up to `max_lines` (method, sparsity) lines share one axes; beyond, one panel per target density."""
    groups = [g for g in aggregate(points) if not g.method.startswith(DENSE)]
    names, one = list(dict.fromkeys(n for g in groups for n in g.layers)), len(groups) <= max_lines
    panels = [(None, groups)] if one else [(t, [g for g in groups if round(g.target, 9) == t])
                                           for t in sorted({round(g.target, 9) for g in groups}, reverse=True)]
    where = "sparsity {:.4g} · density {:.3g}".format
    line = (lambda g: f"{g.method}, {where(1 - g.target, g.target)}") if one else (lambda g: g.method)
    styles = _styles([line(g) for g in groups])
    cols, rows = min(4, len(panels)), math.ceil(len(panels) / min(4, len(panels)))
    # Inches: a panel widens with the layer count, rotated layer names need height, the legend width.
    panel_w, names_h = max(3.6, 0.25 * len(names)), 0.07 * max(map(len, names or [""]))
    legend_w = 1.6 + 0.075 * max(map(len, styles or [""]))
    fig = Figure(figsize=(max(8.0, panel_w * cols + legend_w), (2.8 + names_h) * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
    for ax, (target, gs) in zip(axes, panels):
        for g in gs:
            color, marker = styles[line(g)]
            ax.plot(range(len(names)), [g.layers.get(n, math.nan) for n in names], marker=marker, ms=4,
                    color=color, label=line(g))
        ax.set_yscale("log", nonpositive="mask")  # an emptied layer shows as a gap, not a fake value
        _log_ticks(ax.yaxis)
        ax.set_xticks(range(len(names)), [n.removesuffix(".weight") for n in names], rotation=45, ha="right",
                      rotation_mode="anchor", fontsize=8)
        ax.set_title("" if one else where(1 - target, target), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if not groups:
        axes[0].text(0.5, 0.5, "no pruned run finished yet", ha="center", transform=axes[0].transAxes)
    handles = {lab: h for ax in axes for h, lab in zip(*ax.get_legend_handles_labels())}
    if handles:
        fig.legend([handles[k] for k in styles], list(styles), loc="outside right center", frameon=False)
    fig.supxlabel("layer (network order)")
    fig.supylabel("density (fraction kept, log scale)")
    fig.suptitle(_title(points, "Per-layer density"))
    return _save(fig, path)


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        FigureCanvasAgg(fig).print_png(buf := io.BytesIO())
        atomic_write(Path(path), buf.getvalue())
    return fig


def markdown_table(points: list[Point], missing: list[tuple[str, int, str]] = ()) -> str:
    """A GitHub table, one row per method and sparsity (dense first), then what is missing."""
    lines = ["| method | target sparsity | seeds | test acc mean ± std (%) | val acc mean (%) |",
             "|---|---:|---|---:|---:|"]
    lines += [f"| {g.method} | {1 - g.target:.4f}{' (measured)' if g.measured else ''} | "
              f"{', '.join(map(str, g.seeds))} | {100 * g.test_mean:.2f} ± {100 * g.test_std:.2f} | "
              f"{100 * g.val_mean:.2f} |" for g in aggregate(points)]
    if missing:
        lines += ["", f"**Not computed yet ({len(missing)}):** " +
                  ", ".join(f"{spec} (seed {seed}) {rnd}" for spec, seed, rnd in missing)]
    return "\n".join(lines) + "\n"


def write_report(specs: list[ExperimentSpec], store: Store, out_dir: str | Path) -> Report:
    """accuracy.png, layers.png and report.md in out_dir, each written atomically."""
    points, missing = collect(specs, store)
    if not points:
        raise ValueError(f"nothing to report: none of the {len(specs)} specs has a finished evaluate stage; "
                         "run them first")
    acc, lay, md = (Path(out_dir) / n for n in ("accuracy.png", "layers.png", "report.md"))
    accuracy_plot(points, acc)
    layer_plot(points, lay)
    atomic_write(md, (f"# {_title(points, 'Pruning report')}\n\n{markdown_table(points, missing)}\n"
                      "![test accuracy vs density](accuracy.png)\n\n![per-layer density](layers.png)\n").encode())
    return Report(acc, lay, md, points, missing)
