"""`pai train-distributed`: one process of a torchrun launch (docs/distributed.md). Registered on
the `pai` app by flows/cli.py; kept apart because it runs without Prefect, on every rank."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

SPEC_ARG = typer.Argument(..., help="YAML spec, e.g. configs/lth/lenet300_mnist.yaml")
OVERRIDES_ARG = typer.Argument(None, help="dotted overrides: prune.rate=0.5 train.epochs=2")


def train_distributed(spec: Path = SPEC_ARG, overrides: Optional[list[str]] = OVERRIDES_ARG,
                      track: bool = typer.Option(True, "--track/--no-track", help="MLflow tracking (rank 0 only)")
                      ) -> None:
    """One process of a torchrun launch: `torchrun --nproc_per_node=N -m flows.cli train-distributed SPEC`.
    Every process executes the plan without Prefect, each training split over all of them (DDP, the
    same global batch: one process's result to float tolerance); rank 0 alone writes the store and
    MLflow. Alone (no torchrun) it is a Prefect-free `pai run`. See docs/distributed.md."""
    from rich.markup import escape

    from flows.cli import (RichProgress, Store, _print_rounds, _spec, build_plan, console, err_console, pai_home,
                           pai_progress)

    from pai_core import distributed
    from pai_core.executor import Job
    from pai_core.spec_io import one_line
    from pai_core.store import StoreError

    s = _spec(spec, overrides)
    try:
        distributed.check_launch(s)  # before any process group or compute
    except ValueError as e:
        err_console.print(f"[red]invalid launch[/red] {escape(one_line(str(e)))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    t0, job, store = time.perf_counter(), Job(s, build_plan(s)), Store(pai_home() / "store")
    distributed.init(s.device)
    main, tracking = distributed.is_main(), None
    if main:
        pai_progress.set_progress(RichProgress(console))
    try:
        if track and main:
            from flows.tracking import Tracking

            tracking = Tracking([job], store, None, overrides={id(job): list(overrides or [])})
        out = distributed.execute_jobs([job], store, tracking)
    except (distributed.LaunchAborted, StoreError, ValueError) as e:
        if tracking is not None:
            tracking.abort()
        err_console.print(f"[red]rank {distributed.rank()} stopped[/red] {escape(one_line(str(e)))}",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    finally:
        pai_progress.set_progress(None)
        world = distributed.world()
        distributed.shutdown()
    reused = len(out.refs) - out.computed  # stored before this launch (the in-process runner skips them)
    if tracking is not None:
        tracking.tracker(job).finish({"spec": s.name, "flow": s.flow, "computed": out.computed, "reused": reused,
                                      "world": world, "stages": out.stages}, failed=bool(out.errors))
    if out.errors:
        k, e = next(iter(out.errors.items()))
        err_console.print(f"[red]failed[/red] {k}: {escape(one_line(f'{type(e).__name__}: {e}'))}",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    if main:
        rows = [{"round": r.name, **{k: getattr(out.refs[r.evaluate.key].info, k)
                                     for k in ("sparsity", "val_acc", "test_acc")}} for r in job.plan.rounds]
        _print_rounds(rows, f"{s.name}: {out.computed} stages computed, {reused} reused, {world} processes, "
                            f"{time.perf_counter() - t0:.1f} s")
