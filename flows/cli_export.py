"""`pai export` and `pai speedup`: a finished round as a model file that loads with torch alone,
checked against the masked model, and those files timed against the dense model (docs/export.md).
Registered on the `pai` app by flows/cli.py; the work is pai_core.export_round and pai_core.speedup."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

SpecArg = typer.Argument(..., help="YAML spec, e.g. configs/lth/lenet300_mnist.yaml")
OverridesArg = typer.Argument(None, help="dotted overrides: prune.rate=0.5 train.epochs=2")


def export_cmd(spec: Path = SpecArg, overrides: Optional[list[str]] = OverridesArg,
               fmt: str = typer.Option(..., "--format", "-f",
                                       help="dense | csr | bsr | semi_structured | structured"),
               out: Path = typer.Option(..., "--out", "-o", help="folder for the model file and manifest.json"),
               round_: Optional[str] = typer.Option(None, "--round", "-r",
                                                    help="round name ('round 2') or row of `pai results` "
                                                         "(0 = first); default: the last round"),
               block_size: Optional[int] = typer.Option(None, "--block-size", help="bsr: the B of B×B blocks"),
               sparse_conv: Optional[bool] = typer.Option(None, "--sparse-conv/--dense-conv",
                                                          help="convs as im2col @ sparse matrix "
                                                               "(default: csr yes, bsr no)"),
               device: str = typer.Option("cpu", help="where to build and check it (semi_structured: cuda)"),
               tune_batches: list[int] = typer.Option([], "--tune-batch",
                                                      help="semi_structured: batch sizes to search cuSPARSELt's "
                                                           "fastest algorithm for (repeat; default: the check "
                                                           "batch)"),
               fuse_bias: Optional[bool] = typer.Option(None, "--fuse-bias/--separate-bias",
                                                        help="semi_structured: add each 2:4 layer's bias in the "
                                                             "kernel (cuSPARSELt's epilogue; default) or in a "
                                                             "pass after it")) -> None:
    """Export a finished round as a model that loads without pai-flow (torch.export or TorchScript),
    checked against the masked model; exit 2 with one line if it cannot be exported faithfully."""
    from rich.markup import escape
    from rich.table import Table

    from flows.cli import Store, _spec, console, err_console, pai_home
    from pai_core.export import ExportRefused, RoundNotStored
    from pai_core.export_round import export_round
    from pai_core.spec_io import one_line

    s = _spec(spec, overrides)
    try:
        m = export_round(s, round_, fmt, out, block_size=block_size, device=device, sparse_conv=sparse_conv,
                         store=Store(pai_home() / "store"), tune_batches=tune_batches, fuse_bias=fuse_bias)
    except ExportRefused as e:
        msg = str(e)
        if isinstance(e, RoundNotStored):  # the exact command
            msg = msg.replace("`pai run`", f"`pai run {' '.join([str(spec), *(overrides or [])])}`")
        err_console.print(f"[red]cannot export:[/red] {escape(one_line(msg))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    table = Table("layer", "shape", "density", "stored as", title=f"{s.name}, {m.round['name']}: {fmt}")
    for name, layer in m.layers.items():
        table.add_row(name, "x".join(map(str, layer.shape)), f"{layer.density:.4f}", layer.stored_as)
    console.print(table)
    console.print(f"{escape(str(out / m.file))} ({m.serialization}; load: {m.loader}) and manifest.json; "
                  f"check on {escape(m.check.inputs)}: {m.check.describe()}", highlight=False, soft_wrap=True)


def speedup(spec: Path = SpecArg, overrides: Optional[list[str]] = OverridesArg,
            round_: Optional[str] = typer.Option(None, "--round", "-r",
                                                 help="round name or row of `pai results`; default: the last"),
            formats: list[str] = typer.Option(["dense", "csr"], "--format", "-f",
                                              help="export formats to time (repeat the option)"),
            batches: list[int] = typer.Option([1, 64, 1024], "--batch", "-b", help="batch sizes (repeat the option)"),
            block_size: Optional[int] = typer.Option(None, "--block-size", help="bsr: the B of B×B blocks"),
            device: str = typer.Option("cpu", help="cpu or cuda"),
            repeats: int = typer.Option(7, help="timed runs per figure (the median is reported)"),
            cuda_graph: bool = typer.Option(False, "--cuda-graph",
                                            help="cuda: time both sides replayed from CUDA graphs (kernels "
                                                 "without host work; what a fixed-shape server runs)")) -> None:
    """Time a finished round's exports against its dense torch model (outputs checked first);
    the table is printed and logged to the round's MLflow run."""
    from rich.markup import escape

    from flows.cli import Store, _spec, console, err_console, pai_home
    from pai_core.export import ExportRefused
    from pai_core.export_round import load_masked_model
    from pai_core.spec_io import one_line
    from pai_core.speedup import as_dicts, markdown, measure

    if cuda_graph and not device.startswith("cuda"):
        err_console.print(f"[red]cannot time:[/red] --cuda-graph needs --device cuda (got {escape(device)})",
                          highlight=False)
        raise typer.Exit(2)
    s = _spec(spec, overrides)
    try:
        r = load_masked_model(s, round_, Store(pai_home() / "store"))
    except ExportRefused as e:
        err_console.print(f"[red]cannot time:[/red] {escape(one_line(str(e)))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    rows = measure(f"{s.name}, {r.name}", r.model, r.mask, tuple(r.arch.in_shape), formats=formats, batches=batches,
                   device=device, block_size=block_size, repeats=repeats, cuda_graph=cuda_graph,
                   note="CUDA graph" if cuda_graph else "")
    table = markdown(rows)
    console.print(table, highlight=False, soft_wrap=True)
    from flows.tracking import log_to_round_run

    where = log_to_round_run(s, r.index, {"speedup.md": table}, {"speedup.json": as_dicts(rows)})
    console.print(f"logged to MLflow run {where}" if where else "no finished MLflow run of this round to log to",
                  highlight=False)
