"""Reports: accuracy-vs-density and per-layer-density plots plus a markdown table, from the store.

Pure reading: it never computes, so it works on partial results and says what is missing.
Figures are matplotlib `Figure`s saved through the Agg, PDF and SVG canvases: no pyplot state,
no display needed. PNG (300 dpi) for pages and slides; PDF and SVG for papers."""
from __future__ import annotations

import io
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from pai_core import flops
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
    flops: float = math.nan  # the masked net's share of the dense net's FLOPs (inference, one input)


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
    flops: float = math.nan  # mean share of the dense FLOPs


@dataclass(frozen=True)
class Report:
    accuracy_png: Path
    accuracy_pdf: Path
    accuracy_svg: Path
    layers_png: Path
    layers_pdf: Path
    layers_svg: Path
    flops_png: Path
    flops_pdf: Path
    flops_svg: Path
    markdown: Path
    points: list[Point]
    missing: list[tuple[str, int, str]]  # (spec name, seed, round name)
    extra: tuple[Path, ...] = ()  # an instability analysis's own figure

    @property
    def files(self) -> tuple[Path, ...]:
        """Everything written, plots first: what gets logged."""
        return (self.accuracy_png, self.accuracy_pdf, self.accuracy_svg, self.layers_png, self.layers_pdf,
                self.layers_svg, self.flops_png, self.flops_pdf, self.flops_svg, *self.extra, self.markdown)


def without_images(markdown: str) -> str:
    """A report's markdown less its image lines: what a terminal or a table artifact shows."""
    return "\n".join(line for line in markdown.split("\n") if not line.startswith("![")).rstrip() + "\n"


def method_label(spec: ExperimentSpec, rnd: Round) -> str:
    """What a researcher compares: the criterion / method, not the spec's file name."""
    if rnd.index == 0 and rnd.mask is None and rnd.name == DENSE:
        return DENSE
    return get_paradigm(spec.flow).label(spec, rnd)


def _identity(spec: ExperimentSpec, label: str) -> str:  # a dense baseline is its pretrain: model, data, train
    return spec.model_dump_json(include={"model", "data", "train"} if label == DENSE else None,
                                exclude=None if label == DENSE else _SWEEP)


# Sweep tags that only move a point along a line: its seed or its place on the density axis.
_POSITION_TAGS = {"seed", *(f for fields in _SWEEP.values() if isinstance(fields, set) for f in fields)}


def _line_name(name: str) -> str:
    """A sweep point's name less the tags a line spans (`base[lr=0.1,sparsity=0.9,seed=0]` ->
    `base[lr=0.1]`): seeds and swept sparsities share a line, so its label names neither."""
    m = re.fullmatch(r"(.*)\[([^\[\]]*)\]", name)
    if m is None:
        return name
    tags = [t for t in m.group(2).split(",") if t.partition("=")[0] not in _POSITION_TAGS]
    return m.group(1) + (f"[{','.join(tags)}]" if tags else "")


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
            label = f"{label} [{_line_name(owners[label][_identity(s, label)])}]"
        unique.setdefault((label, r.evaluate.key), (s, r))
    points, missing = [], []
    for (label, key), (s, r) in unique.items():
        if (ref := store.get("evaluate", key)) is None:
            missing.append((s.name, s.seed, r.name))
            continue
        i = ref.info
        layers = {n: float(v["density"]) for n, v in i.layers.items() if n != "total"}
        points.append(Point(s.name, label, s.seed, r.name, r.density, 1 - i.sparsity, i.test_acc,
                            i.val_acc, layers, f"{s.model.name} on {s.data.dataset}", flops.spec_share(s, layers)))
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
                             for n in dict.fromkeys(n for p in ps for n in p.layers)},
                            statistics.fmean(p.flops for p in ps)))
    return sorted(groups, key=lambda g: (not g.method.startswith(DENSE), g.method.casefold(), -g.target))


def _title(points: list[Point], what: str) -> str:
    return f"{what}: {', '.join(sorted({p.setting for p in points}))}"


LINESTYLES = ("-", "--", "-.", ":")


def _styles(keys: list) -> dict[Any, dict[str, Any]]:
    """Plot keywords per method (or per line), the same in both plots and every panel.

    Color, marker and linestyle all change from one line to the next, and every other marker
    is hollow and smaller: two lines with identical data (an LTH round and its reinit control
    share a mask) stay both visible, the later one drawn over the earlier."""
    keys, cmap = list(dict.fromkeys(keys)), colormaps["tab10" if len(set(keys)) <= 10 else "tab20"]
    out = {}
    for i, k in enumerate(keys):
        color = cmap(i % cmap.N)
        out[k] = {"color": color, "marker": "osD^vP*Xph"[i % 10], "linestyle": LINESTYLES[i % len(LINESTYLES)],
                  "markersize": (7.0, 5.5, 4.5)[i % 3], "markeredgewidth": 1.3,
                  "markerfacecolor": "none" if i % 2 else color}
    return out


def _log_ticks(axis) -> None:  # plain 1-2-5 numbers (0.5, 0.2, 0.1) read easier than powers of ten
    axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def density_ticks(densities: list[float], lo: float, hi: float, gap: float) -> list[float]:
    """The distinct densities, densest first, thinned so labels do not overlap on a log axis
    from `lo` to `hi`: each kept one is more than `gap` (a fraction of the span) from the previous."""
    span, kept = math.log(hi / lo), []
    for d in sorted({d for d in densities if d > 0}, reverse=True):
        if not kept or math.log(kept[-1] / d) > gap * span:
            kept.append(d)
    return kept


X_AXES = {"density": ("density (fraction of weights kept, log scale)", "Test accuracy vs density"),
          "flops": ("inference FLOPs (share of the dense net's, log scale)", "Test accuracy vs FLOPs")}


def accuracy_plot(points: list[Point], path: str | Path | None = None, x: str = "density") -> Figure:
    """Test accuracy vs density (or, `x="flops"`, vs the share of the dense FLOPs: where masks of
    one sparsity cost differently), one line per method, dense baseline(s) horizontal.

    Error bars (sample std over seeds) only where a point has several seeds. The log axis is
    inverted so sparsity grows to the right, as in the survey's plots, and labelled with the
    values drawn (0.8, 0.512, 0.107), not powers of ten. A point without a FLOPs count is left
    out of the FLOPs plot. `path`: also saved there, in the format its suffix names."""
    xlabel, title = X_AXES[x]
    groups = [g for g in aggregate(points) if g.method.startswith(DENSE) or not math.isnan(getattr(g, x))]
    fig = Figure(figsize=(9.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for i, g in enumerate(g for g in groups if g.method.startswith(DENSE)):
        several, acc, std = len(g.seeds) > 1, 100 * g.test_mean, 100 * g.test_std
        gray = f"{0.3 + 0.15 * (i % 3):.2f}"
        ax.axhline(acc, color=gray, ls=("--", ":", "-.", "-")[i % 4], lw=1.2,
                   label=f"{g.method} {acc:.2f}{f' ± {std:.2f}' if several else ''} %")
        if several:
            ax.axhspan(acc - std, acc + std, color=gray, alpha=0.08)
    for method, style in _styles([g.method for g in groups if not g.method.startswith(DENSE)]).items():
        gs = sorted((g for g in groups if g.method == method), key=lambda g: -getattr(g, x))
        ax.plot([getattr(g, x) for g in gs], [100 * g.test_mean for g in gs], label=method, **style)
        if spread := [g for g in gs if len(g.seeds) > 1]:
            ax.errorbar([getattr(g, x) for g in spread], [100 * g.test_mean for g in spread],
                        yerr=[100 * g.test_std for g in spread], fmt="none", ecolor=style["color"], elinewidth=1,
                        capsize=3, label=f"_{method} std")
    xs = [getattr(g, x) for g in groups if not g.method.startswith(DENSE)]
    ax.set(xscale="log", xlabel=xlabel, ylabel="test accuracy (%)", title=_title(points, title))
    lo, hi = min(min(xs or [1.0]) / 1.5, 0.5), 1.15
    ax.set_xlim(hi, lo)  # inverted: dense at the left, sparsest at the right
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # beside the data, never on it
    if xs:
        _label_densities(fig, ax, xs, lo, hi)
    else:
        _log_ticks(ax.xaxis)
    return _save(fig, path)


def _label_densities(fig: Figure, ax, xs: list[float], lo: float, hi: float) -> None:
    """Label the measured densities; how many fit depends on the axes' width, which the legend
    decides: lay out once with them all, then keep those a widest label (and a gap) apart."""
    def label(ticks: list[float]) -> None:
        ax.set_xticks(ticks, [f"{d:.3g}" for d in ticks])

    label(density_ticks(xs, lo, hi, 0.0))
    fig.draw_without_rendering()
    widest = max(t.get_window_extent().width for t in ax.get_xticklabels())
    label(density_ticks(xs, lo, hi, (widest + 0.1 * fig.dpi) / ax.get_window_extent().width))
    ax.xaxis.set_minor_formatter(NullFormatter())


def layer_plot(points: list[Point], path: str | Path | None = None, max_lines: int = 8) -> Figure:
    """Per-layer density (log scale) in network order: where each method puts its weights.

    Up to `max_lines` (method, sparsity) lines share one axes; beyond, one panel per target density.
    `path`: also saved there, in the format its suffix names."""
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
            ax.plot(range(len(names)), [g.layers.get(n, math.nan) for n in names], label=line(g), **styles[line(g)])
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


# Dates left out of the vector files: the same results give the same bytes.
_FORMATS = {".png": {"format": "png", "dpi": 300}, ".pdf": {"format": "pdf", "metadata": {"CreationDate": None}},
            ".svg": {"format": "svg", "metadata": {"Date": None}}}


def save_figure(fig: Figure, path: str | Path) -> None:
    """`fig` as PNG (300 dpi), PDF or SVG by `path`'s suffix, written atomically.

    `Figure.savefig` picks the Agg, PDF or SVG canvas for the format: no pyplot involved."""
    path = Path(path)
    if (kw := _FORMATS.get(path.suffix.lower())) is None:
        raise ValueError(f"{path}: a plot is saved as {', '.join(_FORMATS)}")
    fig.savefig(buf := io.BytesIO(), **kw)
    atomic_write(path, buf.getvalue())


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


def markdown_table(points: list[Point], missing: list[tuple[str, int, str]] = ()) -> str:
    """A GitHub table, one row per method and sparsity (dense first), then what is missing.

    "± std" only where there are several seeds: a single run has no spread to show. FLOPs are
    the masked net's share of the dense net's (`flops.spec_share`), blank where it cannot be counted."""
    def acc(g: Group) -> str:
        return f"{100 * g.test_mean:.2f}" + (f" ± {100 * g.test_std:.2f}" if len(g.seeds) > 1 else "")

    lines = ["| method | target sparsity | n seeds | test acc mean ± std (%) | val acc mean (%) | FLOPs (% of dense) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {g.method} | {1 - g.target:.4f}{' (measured)' if g.measured else ''} | {len(g.seeds)} | "
              f"{acc(g)} | {100 * g.val_mean:.2f} | {'' if math.isnan(g.flops) else f'{100 * g.flops:.2f}'} |"
              for g in aggregate(points)]
    if missing:
        lines += ["", f"**Not computed yet ({len(missing)}):** " +
                  ", ".join(f"{spec} (seed {seed}) {rnd}" for spec, seed, rnd in missing)]
    return "\n".join(lines) + "\n"


PLOTS = ("accuracy", "layers", "flops")  # each written as .png, .pdf and .svg


def write_report(specs: list[ExperimentSpec], store: Store, out_dir: str | Path) -> Report:
    """accuracy, layers and FLOPs plots (.png, .pdf, .svg) and report.md in out_dir, each written atomically."""
    points, missing = collect(specs, store)
    if not points:
        raise ValueError(f"nothing to report: none of the {len(specs)} specs has a finished evaluate stage; "
                         "run them first")
    out = Path(out_dir)
    files = {f"{plot}_{ext}": out / f"{plot}.{ext}" for plot in PLOTS for ext in ("png", "pdf", "svg")}
    for plot, fig in (("accuracy", accuracy_plot(points)), ("layers", layer_plot(points)),
                      ("flops", accuracy_plot(points, x="flops"))):
        for ext in ("png", "pdf", "svg"):
            save_figure(fig, files[f"{plot}_{ext}"])
    vector = ", ".join(f"[{n}.{e}]({n}.{e})" for n in PLOTS for e in ("pdf", "svg"))
    from pai_core.instability_report import write_instability  # an instability analysis's own figure

    extra, section = write_instability(specs, store, out)
    md = out / "report.md"
    atomic_write(md, (f"# {_title(points, 'Pruning report')}\n\n{markdown_table(points, missing)}\n"
                      "![test accuracy vs density](accuracy.png)\n\n![per-layer density](layers.png)\n\n"
                      "![test accuracy vs inference FLOPs](flops.png)\n\n"
                      f"Vector versions: {vector}\n{section}").encode())
    return Report(**files, markdown=md, points=points, missing=missing, extra=extra)

