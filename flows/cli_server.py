"""`pai server up|down|status|env`: the local Prefect and MLflow servers (and a worker)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from flows import servers

app = typer.Typer(no_args_is_help=True, help="Local Prefect + MLflow servers and a process worker.")
console = Console()


@app.command()
def up(host: str = typer.Option(servers.DEFAULT_HOST, help="bind address; loopback unless you mean otherwise"),
       prefect_port: int = typer.Option(servers.DEFAULT_PORTS["prefect"]),
       mlflow_port: int = typer.Option(servers.DEFAULT_PORTS["mlflow"]),
       worker: Optional[str] = typer.Option(None, help="also start a process worker for this work pool"),
       timeout: float = typer.Option(180.0, help="seconds to wait for each to answer")) -> None:
    """Start the servers in the background, wait until they answer, record their pids."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]binding to {host}: the servers have no authentication[/yellow]")
    try:
        servers.up(host, prefect_port, mlflow_port, worker, timeout)
    except servers.ServerError as e:
        console.print(f"[red]{e}[/red]", highlight=False)
        raise typer.Exit(1) from None
    status()
    for what, url in servers.ui_urls().items():  # printed whole: a terminal makes them clickable
        console.print(f"{what}: [bold]{url}[/bold]", highlight=False, soft_wrap=True)
    console.print("pai commands on this PAI_HOME now use these servers; for other tools: "
                  "[bold]eval \"$(pai server env)\"[/bold]", soft_wrap=True)


@app.command()
def down() -> None:
    """Stop exactly the processes `up` recorded (SIGTERM, then SIGKILL)."""
    stopped = servers.down()
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def status() -> None:
    """Each recorded process: pid, alive, answering, URL, log file."""
    table = Table("service", "pid", "alive", "answers")
    for col in ("url", "log"):  # folded, never cut: they are copied into browsers and `tail`
        table.add_column(col, overflow="fold")
    for name, s in servers.status().items():
        table.add_row(name, str(s["pid"]), _yn(s["alive"]), _yn(s["healthy"]), s["url"], s["log"])
    console.print(table if table.row_count else "no servers recorded under this PAI_HOME")


@app.command()
def env() -> None:
    """`export` lines for PREFECT_API_URL and MLFLOW_TRACKING_URI of the running servers."""
    for k, v in servers.client_env().items():
        print(f"export {k}={v}")


def _yn(flag: bool) -> str:
    return "[green]yes[/green]" if flag else "[red]no[/red]"


def deploy(specs: Optional[list[Path]] = typer.Argument(None, help="spec YAMLs; default: every spec in configs/"),
           pool: str = typer.Option("local-cpu", help="work pool; `gpu` for GPU workers (README: Scale out)"),
           cron: Optional[str] = typer.Option(None, help='schedule, e.g. "0 3 * * *" (every night at 03:00)'),
           timezone: str = typer.Option("UTC", help="time zone of the cron schedule"),
           paused: bool = typer.Option(False, help="register the schedule but leave it paused")) -> None:
    """One deployment per spec, with the spec as its parameter (a form in the Prefect UI)."""
    from flows.deploy import deploy as deploy_specs
    from flows.deploy import spec_files
    from pai_core.spec_io import SpecError

    try:
        done = deploy_specs(list(specs or spec_files()), pool, cron, timezone, paused)
    except (SpecError, RuntimeError) as e:
        console.print(f"[red]{e}[/red]", highlight=False)
        raise typer.Exit(2) from None
    table = Table("deployment", "spec", "schedule", title=f"deployed to work pool {pool!r}")
    for d in done:
        table.add_row(d.name, _short(d.path), d.schedule or "")
    console.print(table)
    console.print(f"run one: [bold]prefect deployment run '{done[0].name}'[/bold] (with PREFECT_API_URL set), "
                  "or press Run in the UI; start a worker: [bold]pai server up --worker " + pool + "[/bold]")


def _short(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path
