"""The instability analysis's own figure and table (pai_core.paradigms.instability), read from
the store like every report: error along each path, and instability against the rewind point k
at each density (Frankle et al. 2020's Figures 3 and 5), mean ± std over seeds."""
from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

from pai_core.paradigms import ExperimentSpec, build_plan
from pai_core.store import Store


@dataclass(frozen=True)
class PathPoint:
    """One finished path: which spec and seed, where the copies parted (k), at what density."""
    spec: str
    seed: int
    rewind_iter: int
    density: float
    alphas: tuple[float, ...]
    errors: dict[str, tuple[float, ...]]  # split -> error at each α
    instability: dict[str, float]
    setting: str


def collect_paths(specs: list[ExperimentSpec], store: Store) -> list[PathPoint]:
    """Every stored path of the specs' instability rows (other rounds have none); a path shared
    by two specs counts once."""
    seen, out = set(), []
    for s in specs:
        for r in build_plan(s).rounds:
            ref = store.get("interpolate", r.analysis.key) if r.analysis is not None else None
            if ref is None or r.analysis.key in seen:
                continue
            seen.add(r.analysis.key)
            i = ref.info
            out.append(PathPoint(s.name, s.seed, getattr(r, "rewind_iter", 0), r.density,
                                 tuple(p["alpha"] for p in i.path),
                                 {sp: tuple(p[f"{sp}_err"] for p in i.path) for sp in i.splits}, dict(i.instability),
                                 f"{s.model.name} on {s.data.dataset}"))
    return out


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _split(points: list[PathPoint]) -> str:
    splits = {s for p in points for s in p.errors}
    return "test" if "test" in splits else sorted(splits)[0]


def instability_plot(points: list[PathPoint], path: str | Path | None = None) -> Figure:
    """Left: error along the path, one color per k (seed means), the densest rows solid and the
    sparsest dashed. Right: instability against k, one line per density."""
    split = _split(points)
    fig = Figure(figsize=(12.5, 4.5), layout="constrained")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ks = sorted({p.rewind_iter for p in points})
    colors = colormaps["viridis"]
    shown = sorted({max(p.density for p in points), min(p.density for p in points)}, reverse=True)
    for d, style in zip(shown, ("-", "--")):
        for j, k in enumerate(ks):
            runs = [p for p in points if p.rewind_iter == k and p.density == d and split in p.errors]
            if not runs:
                continue
            curve = [100 * statistics.fmean(e) for e in zip(*(p.errors[split] for p in runs))]
            left.plot(runs[0].alphas, curve, color=colors(j / max(len(ks) - 1, 1)), ls=style, marker=".",
                      label=f"k = {k}, density {d:.3g}")
    left.set(xlabel="α (0: first copy, 1: second)", ylabel=f"{split} error (%)", title="error on the path")
    left.legend(loc="upper right", frameon=False, fontsize="small")
    densities = sorted({p.density for p in points}, reverse=True)
    for j, d in enumerate(densities):
        by_k = defaultdict(list)
        for p in points:
            if p.density == d and split in p.instability:
                by_k[p.rewind_iter].append(100 * p.instability[split])
        xs = sorted(by_k)
        stats = [_mean_std(by_k[k]) for k in xs]
        right.errorbar([ks.index(k) for k in xs], [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                       capsize=3, color=colormaps["plasma"](j / max(len(densities), 1)), label=f"density {d:.3g}")
    right.set_xticks(range(len(ks)), [str(k) for k in ks])  # the k swept, evenly spaced (they span decades)
    right.set(xlabel="k, the iteration the copies part at", ylabel=f"instability: {split} error barrier (%)",
              title="instability vs rewind point")
    right.axhline(2.0, color="0.6", ls=":", lw=1, label="2 %: Frankle et al.'s stability threshold")
    right.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize="small")
    fig.suptitle(f"Instability analysis: {', '.join(sorted({p.setting for p in points}))}")
    if path is not None:
        from pai_core.report import save_figure

        save_figure(fig, path)
    return fig


def instability_table(points: list[PathPoint]) -> str:
    """A GitHub table: per k and density, the barrier per split, mean ± std over seeds."""
    splits = sorted({s for p in points for s in p.instability}, key=("train", "val", "test").index)
    groups: dict[tuple[int, float], list[PathPoint]] = defaultdict(list)
    for p in points:
        groups[(p.rewind_iter, p.density)].append(p)

    def cell(ps: list[PathPoint], s: str) -> str:
        xs = [100 * p.instability[s] for p in ps if s in p.instability]
        if not xs:
            return ""
        m, sd = _mean_std(xs)
        return f"{m:.2f}" + (f" ± {sd:.2f}" if len(xs) > 1 else "")

    lines = ["| k | density | n seeds | " + " | ".join(f"instability {s} (%)" for s in splits) + " |",
             "|---:|---:|---:|" + "---:|" * len(splits)]
    for (k, d), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        lines.append(f"| {k} | {d:.4f} | {len(ps)} | " + " | ".join(cell(ps, s) for s in splits) + " |")
    return "\n".join(lines) + "\n"


def write_instability(specs: list[ExperimentSpec], store: Store, out: Path) -> tuple[tuple[Path, ...], str]:
    """The figure (PNG, PDF, SVG) and a report.md section, when the specs hold finished paths;
    nothing otherwise (pai_core.report.write_report calls it for every report)."""
    if not (paths := collect_paths(specs, store)):
        return (), ""
    fig = instability_plot(paths)
    files = tuple(out / f"instability.{ext}" for ext in ("png", "pdf", "svg"))
    from pai_core.report import save_figure  # report.py calls this module: imported here, not at the top

    for f in files:
        save_figure(fig, f)
    return files, (f"\n## Instability (linear interpolation)\n\n{instability_table(paths)}\n"
                   "![instability](instability.png)\n")
