"""`pai`: list, validate, show, run and tabulate experiments.

validate/show/results/list touch only pai_core (fast, no Prefect start-up); run imports
the flows and so Prefect and MLflow.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows.cli_distributed import train_distributed
from flows.cli_export import export_cmd
from flows.cli_export import speedup as speedup_cmd
from flows.cli_report import report as report_cmd
from flows.cli_masks import masks as masks_cmd
from flows.cli_sensitivity import sensitivity as sensitivity_cmd
from flows.cli_server import app as server_app
from flows.cli_server import deploy as deploy_cmd
from pai_core import flops
from pai_core import progress as pai_progress
from pai_core.paths import pai_home
from pai_core.paradigms import ExperimentSpec, build_plan
from pai_core.spec_io import SpecError, load_spec
from pai_core.specs import PruneSpec
from pai_core.store import Store

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="pai-flow: declarative pruning experiments on Prefect, tracked in MLflow.")
app.add_typer(server_app, name="server")
app.command("deploy")(deploy_cmd)
console = Console()
err_console = Console(stderr=True)

SpecArg = typer.Argument(..., help="YAML spec, e.g. configs/lth/lenet300_mnist.yaml")
OverridesArg = typer.Argument(None, help="dotted overrides: prune.rate=0.5 train.epochs=2")


def _spec(path: Path, overrides: Optional[list[str]]) -> ExperimentSpec:
    from rich.markup import escape

    from pai_core.spec_io import one_line

    try:
        return load_spec(path, overrides or [])
    except SpecError as e:
        err_console.print(f"[red]invalid spec[/red] {escape(one_line(str(e)))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _sweep(path: Path) -> Any:
    from rich.markup import escape

    from pai_core.spec_io import one_line
    from pai_core.sweep import load_sweep

    try:
        return load_sweep(path)
    except SpecError as e:
        err_console.print(f"[red]invalid sweep[/red] {escape(one_line(str(e)))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _table(report_md: str) -> str:
    """The report's markdown without its image links: what a terminal can show."""
    from pai_core.report import without_images

    return without_images(Path(report_md).read_text())


@app.command("list")
def list_cmd() -> None:
    """Everything a spec can name: paradigms, criteria, methods, schedules, scopes, models, datasets."""
    from pai_core.catalog import catalog

    table = Table("kind", "name", "what it is")
    last = None
    for kind, name, what in catalog():
        table.add_row(kind if kind != last else "", name, what)
        last = kind
    console.print(table)


@app.command()
def validate(spec: Path = SpecArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Check a spec (or a sweep: every grid point); exit 0, or exit 2 with a one-line error naming the field."""
    from rich.markup import escape

    from pai_core.spec_io import one_line
    from pai_core.sweep import is_sweep_file

    if is_sweep_file(spec):
        if overrides:
            given = escape(one_line(overrides[0][:80]))
            err_console.print(f"[red]invalid sweep[/red] {escape(str(spec))}: overrides ({given}) apply to a spec; "
                              "a sweep varies fields in its grid", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        sw = _sweep(spec)
        console.print(f"ok: sweep {escape(sw.name)}, {len(sw.expand())} specs", highlight=False, soft_wrap=True)
        return
    s = _spec(spec, overrides)
    console.print(f"ok: {escape(s.name)} ({s.flow}, {s.summary()})", highlight=False, soft_wrap=True)


@app.command()
def show(spec: Path = SpecArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """The resolved spec and every stage of its plan: key, and whether it is stored."""
    s = _spec(spec, overrides)
    console.print(yaml.safe_dump(s.model_dump(mode="json"), sort_keys=False).rstrip())
    store = Store(pai_home() / "store")
    plan = build_plan(s)
    table = Table("round", "stage", "role", "key", "status", title=f"plan of {s.name} (store: {store.root})")
    for rnd, nodes in zip(plan.rounds, plan.nodes_by_round()):
        for n in nodes:
            stored = store.get(n.stage, n.key) is not None
            table.add_row(rnd.name, n.stage, n.role, n.key, "[green]stored[/green]" if stored else "to run")
    console.print(table)
    if isinstance(prune := getattr(s, "prune", None), PruneSpec):
        d = [f"{x:.4f}" for x in prune.round_densities()]
        console.print("round densities: " + ", ".join(d if len(d) <= 8 else d[:3] + ["…"] + d[-3:]))
        if prune.structure == "filter":
            console.print(_families_table(s, prune))


def _families_table(s: ExperimentSpec, prune: PruneSpec) -> Table:
    """What structure filter prunes: each family's channel groups and the layers that share them
    (a residual stream's), with the final density each gets (prune.layer_density or the spec's)."""
    from pai_core import structured
    from pai_core.prune_checks import meta_model
    from pai_core.selection import density_of

    final = prune.round_densities()[-1]
    table = Table("family", "channel groups", "layers writing each group", "final density",
                  title="filter families (pai_core/channel_graph.py)")
    for fam, groups in structured.unit_families(meta_model(s), prune.unit_layers, ignore=prune.ignore).items():
        layers = groups[0].layers
        shown = ", ".join(layers[:3]) + (f", … ({len(layers)})" if len(layers) > 3 else "")
        table.add_row(fam, str(len(groups)), shown, f"{density_of(f'{fam}.weight', prune.layer_density, final):.4f}")
    return table


@app.command()
def run(spec: Path = SpecArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Run the spec's flow (Prefect's temporary server unless PREFECT_API_URL is set)."""
    s = _spec(spec, overrides)
    t0 = time.perf_counter()
    from flows import FLOWS

    from rich.markup import escape

    from flows.local_state import TrackingStoreError
    from pai_core.store import StoreError

    from flows.paradigm_flows import OVERRIDES

    pai_progress.set_progress(RichProgress(console))
    token = OVERRIDES.set(list(overrides or []))
    try:
        summary = FLOWS[s.flow](spec=s)
    except (StoreError, TrackingStoreError) as e:  # a read-only store, an unusable tracking database
        err_console.print(f"[red]cannot run[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    finally:
        pai_progress.set_progress(None)
        OVERRIDES.reset(token)
    _print_rounds(summary["rounds"], f"{s.name}: {summary['computed']} stages computed, "
                                     f"{summary['reused']} reused, {time.perf_counter() - t0:.1f} s")


@app.command()
def results(spec: Path = SpecArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """A table per round: sparsity, FLOPs (% of the dense net's), val and test accuracy, best-val
    iteration (from the store)."""
    s = _spec(spec, overrides)
    store = Store(pai_home() / "store")
    plan = build_plan(s)
    splits = list(s.instability.splits) if plan.rounds and plan.rounds[0].analysis is not None else []
    itop = s.flow == "dynamic_sparse"  # in-time over-parameterization rate of the sparse training
    table = Table("round", "sparsity", "FLOPs %", "val acc", "test acc", "best-val iter", "test @ best val",
                  *(f"instability {x}" for x in splits), *(["ITOP"] if itop else []), "stored",
                  title=f"{s.name} ({s.flow})")
    for rnd in plan.rounds:
        ref = store.get("evaluate", rnd.evaluate.key)
        path = store.get("interpolate", rnd.analysis.key) if rnd.analysis is not None else None
        barriers = [f"{path.info.instability[x]:.4f}" if path else "" for x in splits]
        trained = store.get(rnd.trained.stage, rnd.trained.key) if itop and rnd.mask is not None else None
        rate = getattr(trained.info, "itop_rate", None) if trained is not None else None  # absent in old artifacts
        itop_cell = [f"{rate:.4f}" if rate is not None else ""] if itop else []
        if ref is None:
            table.add_row(rnd.name, f"{1 - rnd.density:.4f}", "", "", "", "", "", *barriers, *itop_cell, "no")
            continue
        i = ref.info
        share = flops.spec_share(s, {n: v["density"] for n, v in i.layers.items() if n != "total"})
        table.add_row(rnd.name, f"{i.sparsity:.4f}", "" if math.isnan(share) else f"{100 * share:.2f}",
                      f"{i.val_acc:.4f}", f"{i.test_acc:.4f}",
                      str(i.best.iteration if i.best else ""), f"{i.best.test_acc:.4f}" if i.best else "",
                      *barriers, *itop_cell, "yes" if path is not None or rnd.analysis is None else "path missing")
    console.print(table)


app.command("export")(export_cmd)  # flows/cli_export.py: a round as a model file that loads without pai-flow
app.command("speedup")(speedup_cmd)  # flows/cli_export.py: those exports timed against the dense model


@app.command()
def sweep(path: Path = typer.Argument(..., help="sweep YAML, e.g. configs/sweeps/criteria_lenet300.yaml"),
          sequential: bool = typer.Option(False, help="run stages one by one in this process, not on Dask"),
          workers: Optional[int] = typer.Option(None, help="LocalCluster workers (overrides dask.workers)"),
          address: Optional[str] = typer.Option(None, help="Dask scheduler address (overrides dask.address)")) -> None:
    """Every spec of the sweep, each shared stage once, on Dask; then the report."""
    sw = _sweep(path)
    dask = sw.dask.model_copy(update={k: v for k, v in (("workers", workers), ("address", address)) if v})
    sw = sw.model_copy(update={"dask": dask})
    t0 = time.perf_counter()
    from flows.sweep import sweep as sweep_flow

    state = sweep_flow(sweep=sw, sequential=sequential, return_state=True)
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, dict):  # failed before it could summarise
        err_console.print(f"[red]sweep failed[/red]: {state.message}", highlight=False)
        raise typer.Exit(1)
    console.print(f"{sw.name}: {summary['specs']} specs, {summary['stages_in_plans']} stages in their plans, "
                  f"{summary['distinct_stages']} distinct, executed {summary['executed'] or 'none'}, "
                  f"{time.perf_counter() - t0:.1f} s", highlight=False)
    if summary["report"]:
        console.print(_table(summary["report"]["markdown"]))
        console.print(f"report: {summary['report']['dir']}")
    for name, why in summary["failed"].items():
        err_console.print(f"[red]failed[/red] {name}: {why}", highlight=False)
    if summary["failed"]:
        raise typer.Exit(1)


app.command("report")(report_cmd)  # flows/cli_report.py: plots and a table from stored results


def _print_rounds(rows: list[dict[str, Any]], title: str) -> None:
    extra = [k for k in (rows[0] if rows else {}) if k.startswith("instability ")]
    table = Table("round", "sparsity", "val acc", "test acc", *extra)
    for r in rows:
        table.add_row(r["round"], f"{r['sparsity']:.4f}", f"{r['val_acc']:.4f}", f"{r['test_acc']:.4f}",
                      *(f"{r[k]:.4f}" if k in r else "" for k in extra))
    console.print(table)
    console.print(title, highlight=False)


class RichProgress:
    """pai_core's progress hook drawn as a rich bar per training stage."""

    def __init__(self, console: Console):
        self.console, self.bar, self.task = console, None, None

    def start(self, label: str, total: int, done: int) -> None:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
                            console=self.console, transient=False, disable=not self.console.is_terminal)
        self.bar.start()
        self.task = self.bar.add_task(label, total=total, completed=done, note="")

    def update(self, done: int, **metrics: Any) -> None:
        if self.bar is not None:
            note = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self.bar.update(self.task, completed=done, **({"note": note} if note else {}))

    def epoch(self, row: dict[str, float]) -> None:
        pass  # the bar shows val acc from `update`

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def main() -> None:
    app()


app.command("train-distributed")(train_distributed)  # flows/cli_distributed.py: one process of a torchrun launch
app.command("sensitivity")(sensitivity_cmd)  # flows/cli_sensitivity.py: per-unit pruning sensitivity of a round
app.command("masks")(masks_cmd)  # flows/cli_masks.py: how alike the masks of several rounds are


if __name__ == "__main__":
    sys.exit(main())
