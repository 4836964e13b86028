"""Reports: accuracy-vs-density, accuracy-vs-FLOPs and per-layer-density plots plus a markdown
table, from the store.

Pure reading: it never computes, so it works on partial results and says what is missing. The
data (Points, Groups, labels) are in pai_core.report_data, the figures in pai_core.report_plots;
this module writes them out and names everything a caller needs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pai_core.paradigms import ExperimentSpec
from pai_core.report_data import DENSE, Group, Point, aggregate, collect, method_label
from pai_core.report_plots import _title, accuracy_plot, density_ticks, layer_plot, save_figure
from pai_core.store import Store, atomic_write

__all__ = ["DENSE", "PLOTS", "Group", "Point", "Report", "accuracy_plot", "aggregate", "collect", "density_ticks",
           "layer_plot", "markdown_table", "method_label", "save_figure", "without_images", "write_report"]


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
