"""`pai masks`: how alike are the masks of several finished rounds, against chance (docs/masks.md).
Registered on the `pai` app by flows/cli.py; the computation is pai_core.mask_compare.

Arguments, in any order, as `pai report` takes them: `SPEC[@ROUND]` names one mask (ROUND: a
row of `pai results` or a round's name, 'round-2' for 'round 2'; default the last round);
`FIELD=VALUE` overrides every spec; `N:FIELD=VALUE` overrides only the N-th mask (1 = the
first), so `lth.yaml@3 lth.yaml@3 2:seed=1` compares round 3 of seeds 0 and 1."""
from __future__ import annotations

import csv
import io
import math
import re
import textwrap
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

ARGS = typer.Argument(..., metavar="SPEC[@ROUND]|FIELD=VALUE|N:FIELD=VALUE",
                      help="specs (@ a round's row or name; default: the last round), overrides for every spec, "
                           "and N:FIELD=VALUE for the N-th spec only")
_PER_SPEC = re.compile(r"^(\d+):(.+=.*)$")


@dataclass(frozen=True)
class Target:
    """One mask asked for: a spec file, its round (None = the last), the overrides for every spec
    and its own (N:FIELD=VALUE), applied in that order."""
    path: Path
    round: str | None
    common: list[str]
    own: list[str]

    @property
    def overrides(self) -> list[str]:
        return self.common + self.own


def masks(args: list[str] = ARGS,
          out: Optional[Path] = typer.Option(None, "--out", "-o",
                                             help="folder for masks.csv (every pair, per layer), matrix.csv "
                                                  "and heatmap.png")) -> None:
    """Compare the masks of finished rounds: Jaccard, overlap and their chance level for random
    masks of the same per-layer counts. Two masks: a per-layer table; more: the Jaccard matrix."""
    from rich.markup import escape

    from flows.cli import Store, _spec, console, pai_home
    from pai_core import mask_compare as mc

    targets = parse_args(args)
    specs = [_spec(t.path, t.overrides) for t in targets]
    asked = [f"{s.name}@{t.round or 'last'}" for s, t in zip(specs, targets, strict=True)]
    first = mc.prunable_shapes(specs[0])
    for i, s in enumerate(specs[1:], 2):  # different models are refused before the store is read
        try:
            mc.check_same_layers(first, mc.prunable_shapes(s), ("mask 1", f"mask {i}"))
        except mc.MaskRefused as e:
            _refuse(str(e))
    store = Store(pai_home() / "store")
    rounds = []
    for i, (s, t) in enumerate(zip(specs, targets, strict=True), 1):
        try:
            rounds.append(mc.load_round_mask(s, t.round, store))
        except mc.MaskRefused as e:
            _refuse(f"mask {i} ({asked[i - 1]}): {e}")
    labels = _labels(rounds, targets)
    try:
        m = mc.matrix(mc.align(rounds))
    except mc.MaskRefused as e:
        _refuse(str(e))
    for i, (lab, r) in enumerate(zip(labels, rounds, strict=True), 1):
        note = "" if r.trained else "; its training is not finished (the mask is final)"
        console.print(f"{_name(i, len(rounds))} = {escape(lab)}: density {r.density:.4f}, from its {r.source} "
                      f"({r.key['stage']} {r.key['key'][:12]}){note}", highlight=False, soft_wrap=True)
    if len(rounds) == 2:
        console.print(pair_table(m.pairs[0, 1], labels))
    else:
        console.print(matrix_table(m, labels))
        console.print(pairs_table(m, labels))
    console.print("chance: independent uniformly random masks with the same per-layer counts "
                  "(E|A∩B| = |A|·|B|/n per layer; Jaccard μ/(|A|+|B|−μ)); ratio = Jaccard / chance; "
                  "z = (|A∩B| − μ)/σ", highlight=False, soft_wrap=True)
    if out is not None:
        files = write(m, labels, out)
        console.print(f"wrote {', '.join(escape(str(p)) for p in files)}", highlight=False, soft_wrap=True)


def parse_args(args: list[str]) -> list[Target]:
    """Targets in order, each with the overrides for every spec then its own; exit 2 naming the argument."""
    from pai_core.sweep import is_sweep_file

    targets: list[tuple[Path, str | None]] = []
    common: list[str] = []
    own: list[tuple[int, str]] = []
    for a in args:
        if Path(a).is_file():
            path, rnd = Path(a), None
        elif (per := _PER_SPEC.match(a)) is not None:
            own.append((int(per.group(1)), per.group(2)))
            continue
        elif "@" in a and Path(a.rsplit("@", 1)[0]).is_file():
            path, rnd = Path(a.rsplit("@", 1)[0]), a.rsplit("@", 1)[1]
            if not rnd.strip():
                _refuse(f"{a}: no round after '@'; give a row of `pai results` or a round's name")
        elif "=" in a:
            common.append(a)
            continue
        else:
            _refuse(f"{a}: no such spec file (SPEC[@ROUND]), nor an override (FIELD=VALUE, N:FIELD=VALUE)")
        if is_sweep_file(path):
            _refuse(f"{a}: a sweep YAML; give experiment specs (each SPEC[@ROUND] is one mask)")
        targets.append((path, rnd))
    if len(targets) < 2:
        _refuse(f"give at least two masks (SPEC[@ROUND]); got {len(targets)}")
    for n, o in own:
        if not 1 <= n <= len(targets):
            _refuse(f"{n}:{o}: there is no mask {n}; masks: 1..{len(targets)}")
    return [Target(p, r, common, [o for n, o in own if n == i]) for i, (p, r) in enumerate(targets, 1)]


def _labels(rounds: list[Any], targets: list[Target]) -> list[str]:
    """'spec@round', plus the mask's own overrides; ' #i' where two would still read alike."""
    labels = [f"{r.spec_name}@{r.name}" + (f" [{' '.join(t.own)}]" if t.own else "")
              for r, t in zip(rounds, targets, strict=True)]
    return [f"{lab} #{i}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels, 1)]


def _name(i: int, k: int) -> str:
    return "AB"[i - 1] if k == 2 else str(i)


def _f(x: float, digits: int = 4) -> str:
    return "–" if math.isnan(x) else f"{x:.{digits}f}"


def pair_table(c: Any, labels: list[str]) -> Any:
    """Per layer, then the total: A and B's densities, Jaccard, chance, ratio, both overlaps and z
    (the counts are in masks.csv); narrow enough for an 80-column terminal."""
    from rich import box
    from rich.table import Column, Table

    t = Table(Column("layer", overflow="fold"), *(Column(h, no_wrap=True) for h in (
              "dens A", "dens B", "Jaccard", "chance", "ratio", "A in B", "B in A", "z")),
              title=f"A = {labels[0]}, B = {labels[1]}", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0))
    for i, o in enumerate([*c.layers, c.total]):
        t.add_row(o.layer, _f(o.density_a), _f(o.density_b), _f(o.jaccard), _f(o.chance_jaccard), _f(o.ratio, 2),
                  _f(o.overlap_a), _f(o.overlap_b), _f(o.z, 1),
                  style="bold" if o is c.total else None, end_section=i == len(c.layers) - 1)
    return t


def matrix_table(m: Any, labels: list[str]) -> Any:
    from rich import box
    from rich.table import Table

    k = len(labels)
    t = Table("mask", *(str(j) for j in range(1, k + 1)), title="total Jaccard |A∩B|/|A∪B|", box=box.SIMPLE_HEAD,
              padding=(0, 1, 0, 0))
    for i in range(k):
        t.add_row(f"{i + 1} {labels[i]}", *(_f(m.jaccard[i][j]) for j in range(k)))
    return t


def pairs_table(m: Any, labels: list[str]) -> Any:
    from rich import box
    from rich.table import Table

    t = Table("pair", "Jaccard", "chance", "ratio", "A in B", "B in A", "z", title="every pair, in total (A, B)",
              box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0))
    for (i, j), c in m.pairs.items():
        if i != j:
            o = c.total
            t.add_row(f"{i + 1}, {j + 1}", _f(o.jaccard), _f(o.chance_jaccard), _f(o.ratio, 2), _f(o.overlap_a),
                      _f(o.overlap_b), _f(o.z, 1))
    return t


def write(m: Any, labels: list[str], out: Path) -> list[Path]:
    """masks.csv (every pair, i < j, per layer and total), matrix.csv (the total Jaccard) and heatmap.png."""
    from pai_core.mask_compare import Overlap
    from pai_core.report import save_figure
    from pai_core.store import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(Overlap)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["a", "b", *names])
    for (i, j), c in m.pairs.items():
        if i != j:
            for o in [*c.layers, c.total]:
                w.writerow([labels[i], labels[j], *asdict(o).values()])
    files = [out / "masks.csv", out / "matrix.csv", out / "heatmap.png"]
    atomic_write(files[0], buf.getvalue().encode())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["mask", *labels])
    for lab, row in zip(labels, m.jaccard, strict=True):
        w.writerow([lab, *row])
    atomic_write(files[1], buf.getvalue().encode())
    save_figure(heatmap(m, labels), files[2])
    return files


def heatmap(m: Any, labels: list[str]) -> Any:
    """The total Jaccard of every pair, each cell annotated with it and its ratio to chance; a
    matplotlib Figure (no pyplot state), as pai_core/report.py draws."""
    from matplotlib.figure import Figure

    k = len(labels)
    ticks = [textwrap.shorten(f"{i + 1} {lab}", 40, placeholder="…") for i, lab in enumerate(labels)]
    side = 2.2 + 1.1 * k
    fig = Figure(figsize=(side + 1.5 + 0.075 * max(map(len, ticks)), side), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(m.jaccard, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(k):
        for j in range(k):
            ratio = m.pairs[min(i, j), max(i, j)].total.ratio
            ax.text(j, i, f"{_f(m.jaccard[i][j], 3)}\n×{_f(ratio, 2)}", ha="center", va="center", fontsize=8,
                    color="black" if m.jaccard[i][j] > 0.6 else "white")
    ax.set_xticks(range(k), [str(i + 1) for i in range(k)])
    ax.set_yticks(range(k), ticks)
    fig.colorbar(im, ax=ax, label="Jaccard |A∩B| / |A∪B|")
    ax.set_title(textwrap.fill("Mask similarity (total Jaccard); ×: ratio to random masks of the same "
                               "per-layer counts", 60), fontsize=9)
    return fig


def _refuse(msg: str) -> NoReturn:
    from rich.markup import escape

    from flows.cli import err_console
    from pai_core.spec_io import one_line

    err_console.print(f"[red]pai masks[/red]: {escape(one_line(msg))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)
