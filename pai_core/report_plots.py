"""A report's figures: test accuracy against density or inference FLOPs, and per-layer density,
as matplotlib `Figure`s saved through the Agg, PDF and SVG canvases: no pyplot state, no display
needed. PNG (300 dpi) for pages and slides; PDF and SVG for papers."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from pai_core.report_data import DENSE, Point, aggregate
from pai_core.store import atomic_write


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
