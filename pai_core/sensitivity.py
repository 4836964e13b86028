"""Per-unit pruning sensitivity of a finished round: prune ONE unit alone (a weight tensor, or one
family of filters) to several densities, with no retraining, and evaluate it on the val split.

Li et al. 2017 ("Pruning Filters for Efficient ConvNets", Fig. 2) and Han et al. 2015 choose
per-layer pruning rates from such curves: a layer whose accuracy falls early is pruned less.
Followed here: filters ranked by the L1 norm of their weights (Li et al.), every other unit left
exactly as the round has it, no retraining, default densities 0.9, 0.8, ..., 0.1 (Li et al.'s
10 % steps; Distiller's `--sense-range` default is sparsities 0 to 0.9 in 0.05 steps).
Where this differs from the references, on purpose:

- A density is of the unit's *surviving* weights (or channel groups): a layer the round left at
  20 %, pruned to density 0.5, keeps 10 % of its weights. Distiller's
  `perform_sensitivity_analysis` sets an absolute sparsity of the whole tensor instead, which a
  pruned round may already exceed (its curve would be flat and say nothing).
- A filter unit is a channel_graph family: a residual stream's channel goes from every conv that
  writes it, and the input channels a removed filter fed go too (structured.filter_mask).
  Li et al. prune one conv's filters and the next layer's kernels; Distiller's filter mode ranks
  a single conv's filters and masks them alone.
- Accuracy is measured on the val split, not test: rates chosen from it leave test unbiased.
"""
from __future__ import annotations

import copy
import json
import math
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pai_core import channel_graph, structured
from pai_core.data import Split
from pai_core.masks import Mask, apply_mask, prunable_names
from pai_core.selection import select
from pai_core.store import atomic_write
from pai_core.training import evaluate

STRUCTURES = ("unstructured", "filter")
DEFAULT_DENSITIES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
BASELINE = "baseline"  # the unit name of the round itself, unpruned further


class SensitivityRefused(ValueError):
    """Options that cannot be run; the message is one line naming the option and what is allowed."""


@dataclass(frozen=True)
class Row:
    """One evaluation. `unit_size`: the unit's weights (unstructured) or channel groups (filter);
    `alive`: how many of them the round kept; `kept`: how many this trial keeps,
    round(alive · density). The baseline row is the round itself (unit BASELINE, density 1)."""
    unit: str
    unit_size: int
    alive: int
    density: float
    kept: int
    val_acc: float
    val_loss: float


@dataclass(frozen=True)
class Trial:
    """The mask of one (unit, density): the round's mask with that unit alone pruned further."""
    unit: str
    unit_size: int
    alive: int
    density: float
    kept: int
    mask: Mask


def check_options(densities: Sequence[float], structure: str = "unstructured", norm: str = "l1") -> None:
    """Refuse bad option values (SensitivityRefused, one line naming the option and what is allowed)."""
    if structure not in STRUCTURES:
        raise SensitivityRefused(f"--structure: unknown {structure!r}; allowed: {', '.join(STRUCTURES)}")
    if norm not in structured.NORMS:
        raise SensitivityRefused(f"--norm: unknown {norm!r}; allowed: {', '.join(structured.NORMS)}")
    if not densities:
        raise SensitivityRefused("--density: none given; allowed: numbers in (0, 1]")
    for d in densities:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (math.isfinite(d) and 0 < d <= 1):
            raise SensitivityRefused(f"--density: {d!r} is outside (0, 1]; allowed: numbers in (0, 1]")


def check(model: nn.Module, mask: Mask, densities: Sequence[float], structure: str = "unstructured",
          norm: str = "l1") -> None:
    """check_options, then what the net must allow: filter structure needs channel groups
    channel_graph can trace, at least one of them removable. All before any evaluation."""
    check_options(densities, structure, norm)
    if structure == "filter":
        try:
            families = structured.unit_families(model, "all")
        except channel_graph.ChannelGraphError as e:
            raise SensitivityRefused(f"--structure filter: {type(model).__name__}'s channels cannot be grouped "
                                     f"({_line(e)}); allowed: unstructured") from None
        if not families:
            raise SensitivityRefused(f"--structure filter: {type(model).__name__} has no removable channel "
                                     "group; allowed: unstructured")
    elif not _units(model, mask):
        raise SensitivityRefused("--structure unstructured: the mask holds no Conv/Linear weight; allowed: filter")


def trials(model: nn.Module, mask: Mask, densities: Sequence[float], structure: str = "unstructured",
           norm: str = "l1") -> Iterator[Trial]:
    """Every (unit, density) mask, unit by unit in network order, densities as given.

    Scores are |w| of the round's masked weights. Unstructured: a unit is one prunable weight
    tensor of the mask; it keeps round(alive · d) of its surviving weights by |w|, ties to the
    lower index (selection.select over the survivors alone). Filter: a unit is one family of
    structured.unit_families; it keeps round(alive · d) of its surviving channel groups by
    structured.filter_scores (`norm`), and filter_mask removes each dropped group's filters and
    every input channel it fed. Groups the round had already emptied are not touched again, so
    density 1 gives the round's own mask. Every other weight keeps the round's mask."""
    check(model, mask, densities, structure, norm)
    params = dict(model.named_parameters())
    base = {n: m.detach().cpu().bool() for n, m in mask.items()}
    w = {n: params[n].detach().cpu() * base[n] for n in base}
    if structure == "unstructured":
        for unit in _units(model, base):
            alive = base[unit]
            for d in densities:
                keep = alive.clone()
                keep[alive] = _keep(w[unit][alive].abs(), d)
                yield Trial(unit, alive.numel(), int(alive.sum()), float(d), int(keep.sum()), {**base, unit: keep})
        return
    graph = channel_graph.trace(model)
    full = {f"{n}.weight": base.get(f"{n}.weight", torch.ones_like(m.weight, dtype=torch.bool, device="cpu"))
            for n, m in structured.chain(model)}
    scores = {f"{n}.weight": params[f"{n}.weight"].detach().cpu() * full[f"{n}.weight"]
              for n, _ in structured.chain(model)}
    alive_groups = structured.kept_filters(model, full, graph)
    unit_scores = structured.filter_scores(model, scores, norm, "all", graph)
    for fam, s in unit_scores.items():
        alive = alive_groups[fam]
        for d in densities:
            keep = alive.clone()
            keep[alive] = _keep(s[alive], d)
            # Only the groups this trial drops go: those the round emptied stay as the round left them.
            removed = structured.filter_mask(model, {fam: keep | ~alive}, graph)
            trial = {n: m & removed[n] if n in removed else m for n, m in base.items()}
            trial |= {n: m for n, m in removed.items() if n not in base and not bool(m.all())}
            yield Trial(fam, len(alive), int(alive.sum()), float(d), int(keep.sum()), trial)


def sensitivity(model: nn.Module, mask: Mask, val_split: Split, densities: Sequence[float] = DEFAULT_DENSITIES,
                structure: str = "unstructured", norm: str = "l1", batch_size: int = 1000) -> list[Row]:
    """The baseline row (the round: `model` with `mask`), then one row per trial of `trials`,
    each evaluated by training.evaluate (eval mode) on `val_split`. Works on a copy: the
    caller's model and mask are never changed."""
    check(model, mask, densities, structure, norm)
    net = copy.deepcopy(model)
    apply_mask(net, mask)
    params = dict(net.named_parameters())
    saved = {n: params[n].detach().clone() for n in dict.fromkeys([*mask, *prunable_names(net)])}
    units = _units(model, mask)
    total, alive = sum(mask[n].numel() for n in units), sum(int(mask[n].sum()) for n in units)
    first = evaluate(net, val_split, batch_size)
    rows = [Row(BASELINE, total, alive, 1.0, alive, first["acc"], first["loss"])]
    for t in trials(model, mask, densities, structure, norm):
        with torch.no_grad():
            for n, p in saved.items():
                params[n].copy_(p)
        apply_mask(net, t.mask)
        m = evaluate(net, val_split, batch_size)
        rows.append(Row(t.unit, t.unit_size, t.alive, t.density, t.kept, m["acc"], m["loss"]))
    return rows


# --------------------------------------------------------------------- output


def markdown(rows: list[Row], title: str = "") -> str:
    """A GitHub table: one row per unit, one column per density (val accuracy, %), the baseline above."""
    base = next(r for r in rows if r.unit == BASELINE)
    units = list(dict.fromkeys(r.unit for r in rows if r.unit != BASELINE))
    densities = list(dict.fromkeys(r.density for r in rows if r.unit != BASELINE))
    acc = {(r.unit, r.density): r for r in rows if r.unit != BASELINE}
    lines = [title] if title else []
    lines += [f"Baseline (the round, no further pruning): val acc {100 * base.val_acc:.2f} %, "
              f"loss {base.val_loss:.4f}; {base.alive} of {base.unit_size} weights kept.", "",
              "| unit | size | alive | " + " | ".join(f"d={d:g}" for d in densities) + " |",
              "|---|---:|---:|" + "---:|" * len(densities)]
    for u in units:
        first = next(r for r in rows if r.unit == u)
        cells = [f"{100 * acc[(u, d)].val_acc:.2f}" if (u, d) in acc else "" for d in densities]
        lines.append(f"| {u} | {first.unit_size} | {first.alive} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: str | Path | None = None, title: str = "") -> Any:
    """Val accuracy vs the unit's density, one line per unit, the baseline dashed; a matplotlib
    Figure (no pyplot state), saved at `path` in the format its suffix names (png, pdf, svg)."""
    from matplotlib.figure import Figure

    from pai_core.report_plots import _styles, save_figure

    base = next(r for r in rows if r.unit == BASELINE)
    units = list(dict.fromkeys(r.unit for r in rows if r.unit != BASELINE))
    fig = Figure(figsize=(9.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(100 * base.val_acc, color="0.35", ls="--", lw=1.2, label=f"baseline {100 * base.val_acc:.2f} %")
    for u, style in _styles(units).items():
        pts = sorted(((r.density, 100 * r.val_acc) for r in rows if r.unit == u), reverse=True)
        ax.plot([d for d, _ in pts], [a for _, a in pts], label=u, **style)
    ax.set(xlabel="density of the unit (the fraction of its surviving weights, or channel groups, kept)",
           ylabel="val accuracy (%)",
           title=textwrap.fill(title or "Sensitivity: one unit pruned alone, no retraining", 90))
    ax.set_xlim(1.02, min([r.density for r in rows] + [1.0]) - 0.02)  # inverted: sparser to the right
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=8)
    if path is not None:
        save_figure(fig, path)
    return fig


def write(rows: list[Row], out_dir: str | Path, meta: dict[str, Any], title: str = "") -> dict[str, Path]:
    """sensitivity.json (meta and rows), sensitivity.md and the plot as PNG, PDF and SVG in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "sensitivity.json", "md": out / "sensitivity.md"}
    atomic_write(files["json"], (json.dumps(as_dict(rows, meta), indent=2) + "\n").encode())
    atomic_write(files["md"], markdown(rows, title).encode())
    fig = plot(rows, title=title)
    from pai_core.report import save_figure

    for ext in ("png", "pdf", "svg"):
        files[ext] = out / f"sensitivity.{ext}"
        save_figure(fig, files[ext])
    return files


def as_dict(rows: list[Row], meta: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "rows": [asdict(r) for r in rows]}


# --------------------------------------------------------------------- helpers


def _units(model: nn.Module, mask: Mask) -> list[str]:
    """The mask's prunable weight tensors (not biases), in module order."""
    return [n for n in prunable_names(model) if n in mask]


def _keep(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Which of these (surviving) entries to keep: the round(n · density) best, ties to the lower
    index, by selection.select on a one-layer dict of the survivors alone."""
    if scores.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    return select({"u": scores}, {"u": torch.ones(scores.numel(), dtype=torch.bool)}, density)["u"]


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]
