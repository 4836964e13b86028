"""`pai report`: accuracy-vs-density and per-layer plots plus a table, from stored results of
spec files, a sweep, or a Prefect flow run. Registered on the `pai` app by flows/cli.py; the
work is flows/report.py."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Optional

import typer

from pai_core.spec_io import SpecError

if TYPE_CHECKING:
    from pai_core.paradigms import ExperimentSpec


def report(args: Optional[list[str]] = typer.Argument(
               None, metavar="SPEC|FIELD=VALUE",
               help="a sweep YAML, or experiment spec YAMLs and dotted overrides (prune.rate=0.5) applied to each"),
           name: Optional[str] = typer.Option(None, help="default: the sweep's or the first spec's name"),
           flow_run: Optional[str] = typer.Option(
               None, "--flow-run", help="instead of files: the id of a Prefect flow run (paradigm or sweep) to report")
           ) -> None:
    """Accuracy-vs-density and per-layer plots (PNG, PDF, SVG) plus a table from stored results;
    logged to MLflow and published as Prefect artifacts."""
    if flow_run is not None:
        if args:
            _usage_error(f"--flow-run takes no spec files or overrides (got {args[0][:80]}): the flow run's "
                         "parameters say what it ran")
        specs, default = _flow_run_specs(flow_run)
    else:
        specs, default = _report_specs(args or [])
    name = name or default
    from flows.cli import _table, console, err_console
    from flows.report import report as report_flow

    try:
        out = report_flow(specs=specs, name=name)
    except ValueError as e:
        err_console.print(f"[red]{e}[/red]", highlight=False)
        raise typer.Exit(1) from None
    console.print(_table(out["markdown"]))
    extra = ", instability.{png,pdf,svg}" if out.get("extra") else ""
    console.print(f"plots: {out['dir']}/accuracy.{{png,pdf,svg}}, layers.{{png,pdf,svg}}{extra}; "
                  f"MLflow run {out['mlflow_run_id']}", highlight=False, soft_wrap=True)


def _usage_error(msg: str) -> NoReturn:
    from rich.markup import escape

    from flows.cli import err_console
    from pai_core.spec_io import one_line

    err_console.print(f"[red]pai report[/red]: {escape(one_line(msg))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _report_specs(args: list[str]) -> tuple[list[ExperimentSpec], str]:
    """Files, then overrides for every spec: an argument with '=' that is not a file is one."""
    from rich.markup import escape

    from flows.cli import _spec, _sweep, err_console
    from pai_core.spec_io import one_line
    from pai_core.sweep import is_sweep_file

    overrides = [a for a in args if "=" in a and not Path(a).exists()]
    paths = [Path(a) for a in args if a not in overrides]
    if not paths:
        _usage_error("give a sweep YAML or experiment spec YAMLs (overrides alone name no experiment), "
                     "or --flow-run ID")
    if len(paths) == 1 and is_sweep_file(paths[0]):
        if overrides:
            given = escape(one_line(overrides[0][:80]))
            err_console.print(f"[red]invalid sweep[/red] {escape(str(paths[0]))}: overrides ({given}) apply to a "
                              "spec; a sweep varies fields in its grid", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        sw = _sweep(paths[0])
        return sw.expand(), sw.name
    specs = [_spec(p, overrides) for p in paths]
    return specs, specs[0].name


def _flow_run_specs(flow_run: str) -> tuple[list[ExperimentSpec], str]:
    """The specs of a Prefect flow run: exit 2 for a malformed id or a flow run that ran no
    spec or sweep, exit 1 when the API has no such run or cannot be reached."""
    from uuid import UUID

    from prefect.exceptions import ObjectNotFound
    from rich.markup import escape

    from flows.cli import err_console
    from flows.report import read_flow_run, specs_of_flow_run
    from pai_core.spec_io import one_line

    try:
        uid = UUID(flow_run)
    except ValueError:
        _usage_error(f"--flow-run {flow_run[:80]}: not a flow run id (a UUID, as in the Prefect UI's address)")
    try:
        run = read_flow_run(uid)
    except ObjectNotFound:
        err_console.print(f"[red]no flow run[/red] {uid} on the Prefect API", highlight=False)
        raise typer.Exit(1) from None
    except Exception as e:  # an unreachable server, a refused connection: one line, not a trace
        err_console.print(f"[red]cannot read flow run[/red] {uid}: {escape(one_line(str(e) or type(e).__name__))}",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    try:
        return specs_of_flow_run(run)
    except SpecError as e:
        err_console.print(f"[red]cannot report[/red] {escape(one_line(str(e)))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
