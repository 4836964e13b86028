"""`pai sensitivity`: per-unit pruning sensitivity of a finished round (docs/sensitivity.md).
Registered on the `pai` app by flows/cli.py; the computation is pai_core.sensitivity."""
from __future__ import annotations

import re
from pathlib import Path
from typing import NoReturn, Optional

import typer

from pai_core.sensitivity import DEFAULT_DENSITIES, STRUCTURES

SPEC_ARG = typer.Argument(..., help="YAML spec, e.g. configs/lth/lenet300_mnist.yaml")
OVERRIDES_ARG = typer.Argument(None, help="dotted overrides: prune.rate=0.5 train.epochs=2")
DEVICES = ("cpu", "cuda", "auto")


def sensitivity(spec: Path = SPEC_ARG, overrides: Optional[list[str]] = OVERRIDES_ARG,
                round_: Optional[str] = typer.Option(None, "--round", "-r",
                                                     help="round name or row of `pai results`; default: the last"),
                structure: str = typer.Option("unstructured", "--structure", "-s",
                                              help=f"what one unit is: {' | '.join(STRUCTURES)}"),
                densities: list[float] = typer.Option(list(DEFAULT_DENSITIES), "--density", "-d",
                                                      help="fraction of the unit's surviving weights (filter: "
                                                           "channel groups) kept; repeat the option"),
                norm: str = typer.Option("l1", "--norm", help="filter: how weights' |w| make a group score, "
                                                              "l1 | l2 | max"),
                out: Optional[Path] = typer.Option(None, "--out", "-o",
                                                   help="output folder; default ./sensitivity-<spec name>-<round>"),
                device: str = typer.Option("cpu", help="cpu | cuda | auto")) -> None:
    """Prune each layer (or filter family) of a finished round alone to each density, without
    retraining, and evaluate on val (Li et al. 2017, Fig. 2): a table is printed, the table,
    JSON and plots are written to OUT and logged to the round's MLflow run."""
    from flows.cli import Store, _spec, console, pai_home
    from pai_core import sensitivity as sens
    from pai_core.export import ExportRefused
    from pai_core.export_round import load_masked_model

    s = _spec(spec, overrides)
    try:
        sens.check_options(densities, structure, norm)
        if device not in DEVICES:
            raise sens.SensitivityRefused(f"--device: unknown {device!r}; allowed: {', '.join(DEVICES)}")
    except sens.SensitivityRefused as e:
        _refuse(str(e))
    store = Store(pai_home() / "store")
    try:
        r = load_masked_model(s, round_, store)
    except ExportRefused as e:
        _refuse(f"--round: {e}")
    try:
        sens.check(r.model, r.mask, densities, structure, norm)
    except sens.SensitivityRefused as e:
        _refuse(str(e))

    from pai_core import data as data_lib
    from pai_core.stages.common import bundle_for
    from pai_core.stages.registry import Runtime

    rt = Runtime(store, device)
    try:
        dev = rt.torch_device
    except RuntimeError as e:
        _refuse(f"--device: {e}; allowed: {', '.join(DEVICES)}")
    try:
        val = bundle_for(r.data, rt).val
    except (data_lib.DataUnavailable, OSError) as e:
        _refuse(f"data: {r.data.get('dataset')} cannot be loaded here ({' '.join(str(e).split())[:200]})", code=1)
    rows = sens.sensitivity(r.model.to(dev), r.mask, val, densities, structure, norm)
    unit, of, score = (("filter family", "channel groups", f"|w|, {norm}") if structure == "filter"
                       else ("layer", "weights", "|w|"))
    title = (f"{s.name}, {r.name}: val accuracy (%) with one {unit} pruned alone to each density of its "
             f"surviving {of} ({score}), no retraining")
    table = sens.markdown(rows, title)
    console.print(table, highlight=False, soft_wrap=True)
    out = out or Path(f"sensitivity-{_safe(s.name)}-{_safe(r.name)}")
    meta = {"spec": s.name, "round": {"index": r.index, "name": r.name}, "structure": structure, "norm": norm,
            "densities": list(densities), "split": f"{r.data.get('dataset')} val", "examples": len(val),
            "stage_keys": r.keys}
    files = sens.write(rows, out, meta, title)
    console.print(f"wrote {', '.join(str(p) for p in files.values())}", highlight=False, soft_wrap=True)
    from flows.env import mlflow_client
    from flows.tracking import log_to_round_run

    folder = f"sensitivity-{structure}"
    where = log_to_round_run(s, r.index, {f"{folder}/sensitivity.md": table},
                             {f"{folder}/sensitivity.json": sens.as_dict(rows, meta)})
    if where:
        mlflow_client().log_artifact(where, str(files["png"]), folder)
    console.print(f"logged to MLflow run {where}" if where else "no finished MLflow run of this round to log to",
                  highlight=False)


def _safe(name: str) -> str:
    """A folder-name part: 'round 2' -> 'round-2'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "x"


def _refuse(msg: str, code: int = 2) -> NoReturn:
    from rich.markup import escape

    from flows.cli import err_console
    from pai_core.spec_io import one_line

    err_console.print(f"[red]pai sensitivity[/red]: {escape(one_line(msg))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
