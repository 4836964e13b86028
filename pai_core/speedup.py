"""How much faster is a sparse model, really: every export format timed against the dense
torch model on the same inputs, outputs checked first.

What is timed is what a user gets: each format is built (`pai_core.export.build`, which checks
its outputs against the masked model), saved, loaded back from its file as `pai export` would
leave it, checked again, and called under `torch.inference_mode`. The baseline is the plain
torch model with the masked weights stored dense (what pai-flow trains). Each figure is the
median over `repeats` timed runs after `warmup` calls; a run is as many calls as take at least
`min_run_s`, so a 50 µs call is not timed by itself. Threads: torch's intra-op count, stated.

On CUDA, `cuda_graph=True` times both sides replayed from CUDA graphs (one per batch size,
captured after warm-up), as a fixed-shape server would run them: the kernels alone, without
the host work between them. That matters for 2:4: torch (2.11-2.14) rebuilds cuSPARSELt's
plan on every eager call, about 0.9 ms on an H200, more than a 4096-wide layer's kernel takes.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pai_core.export import (ExportRefused, build, check_outputs, get_format, load_exported, masked_copy,
                             save_module)
from pai_core.masks import Mask

DEFAULT_FORMATS = ("dense", "csr", "bsr")
DEFAULT_BATCHES = (1, 64, 1024)


@dataclass(frozen=True)
class Timing:
    median_s: float   # per call
    spread: float     # (max - min) / median over the runs: how steady the machine was
    calls: int        # calls per timed run


@dataclass(frozen=True)
class Row:
    model: str
    format: str
    batch: int
    device: str
    threads: int
    seconds: float       # median per call
    dense_seconds: float
    speedup: float       # dense / this
    max_abs_diff: float  # against the masked model on these inputs
    spread: float
    note: str = ""


def time_call(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 7, min_run_s: float = 0.05,
              sync: Callable[[], None] = lambda: None) -> Timing:
    """Median seconds per call of `fn` (see the module docstring)."""
    for _ in range(warmup):
        fn()
    sync()
    calls, elapsed = 1, 0.0
    while True:  # calibrate: how many calls make one run of at least min_run_s
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_run_s or calls >= 1 << 16:
            break
        calls *= 2
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        runs.append((time.perf_counter() - start) / calls)
    med = statistics.median(runs)
    return Timing(med, (max(runs) - min(runs)) / med if med else 0.0, calls)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def measure(name: str, model: nn.Module, mask: Mask, in_shape: Sequence[int], *,
            formats: Sequence[str] = DEFAULT_FORMATS, batches: Sequence[int] = DEFAULT_BATCHES,
            device: str = "cpu", block_size: int | None = None, seed: int = 0, warmup: int = 3,
            repeats: int = 7, min_run_s: float = 0.05, baseline: nn.Module | None = None,
            cuda_graph: bool = False, note: str = "", fuse_bias: bool | None = None,
            log: Callable[[str], None] = lambda _: None) -> list[Row]:
    """One row per (format, batch): its time, the dense model's, the ratio, the output check.
    A format that cannot express this model and mask (`ExportRefused`) gets one row saying why.
    `baseline` is what is timed as dense (default: the masked model, float32, weights dense);
    `fuse_bias`: False makes semi_structured layers add their bias after the product, not in the
    kernel (pai_core.export.to_format)."""
    dev = torch.device(device)
    if cuda_graph and dev.type != "cuda":
        raise ValueError(f"cuda_graph needs a CUDA device, not {device}")
    reference = masked_copy(model, mask).to(dev).eval()
    dense_net = reference if baseline is None else baseline.to(dev).eval()
    gen = torch.Generator().manual_seed(seed)
    inputs = {b: torch.randn(b, *in_shape, generator=gen).to(dev) for b in batches}
    threads = torch.get_num_threads()
    rows: list[Row] = []
    with torch.inference_mode():
        expected = {b: reference(x) for b, x in inputs.items()}

    def timed(fn: Callable[[], Any]) -> Timing:
        return time_call(fn, warmup=warmup, repeats=repeats, min_run_s=min_run_s, sync=_sync(dev))

    for fmt in formats:
        try:
            module = _loaded(fmt, model, mask, inputs[max(batches)], block_size, device, batches, fuse_bias)
        except ExportRefused as e:
            rows += [Row(name, fmt, b, device, threads, float("nan"), float("nan"), float("nan"), float("nan"),
                         0.0, f"refused: {e}") for b in batches]
            log(f"{name} {fmt}: refused: {e}")
            continue
        for b, x in inputs.items():
            with torch.inference_mode():
                runners = _runners(dense_net, module, x, cuda_graph)
                if isinstance(runners, str):
                    rows.append(Row(name, fmt, b, device, threads, *[float("nan")] * 4, 0.0, runners))
                    log(f"{name} {fmt} batch {b}: {runners}")
                    continue
                run_dense, run = runners
                check = check_outputs(lambda _: run(), expected[b], x, fmt, what=f"{name} {fmt} batch {b}")
                # side by side, dense first each time: drift on a shared machine hits both alike
                dense, t = timed(run_dense), timed(run)
            rows.append(Row(name, fmt, b, device, threads, t.median_s, dense.median_s,
                            dense.median_s / t.median_s, check.max_abs_diff, max(t.spread, dense.spread),
                            note))
            log(f"{name} {fmt} batch {b}: {t.median_s * 1e3:.3f} ms vs dense {dense.median_s * 1e3:.3f} ms "
                f"({rows[-1].speedup:.2f}x)")
    return rows


def _runners(dense_net: Callable[[Tensor], Tensor], module: Callable[[Tensor], Tensor], x: Tensor,
             cuda_graph: bool) -> tuple[Callable[[], Tensor], Callable[[], Tensor]] | str:
    """The two calls to time on `x`, eager or replayed from CUDA graphs; or why they cannot be
    (a row's note: a kernel that waits on the host cannot be captured)."""
    if not cuda_graph:
        return (lambda: dense_net(x)), (lambda: module(x))
    try:
        return graph_replay(dense_net, x), graph_replay(module, x)
    except RuntimeError as e:
        return f"refused: not capturable in a CUDA graph: {(str(e).splitlines() or [repr(e)])[0]}"


def graph_replay(module: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], Tensor]:
    """`module(x)` captured into a CUDA graph: the returned call replays its kernels on the same
    (static) input and returns the same (static) output tensor. Warmed up on a side stream first,
    as capture requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            module(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = module(x)

    def replay() -> Tensor:
        graph.replay()
        return out

    return replay


def _loaded(fmt: str, model: nn.Module, mask: Mask, example: Tensor, block_size: int | None, device: str,
            batches: Sequence[int], fuse_bias: bool | None = None) -> Any:
    """The format's module as its file loads back (built, tuned for `batches`, checked first)."""
    module = build(fmt, model, mask, example, block_size=block_size if fmt == "bsr" else None, device=device,
                   tune_batches=batches if fmt == "semi_structured" else (),
                   fuse_bias=fuse_bias if fmt == "semi_structured" else None)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_module(module, fmt, Path(tmp) / get_format(fmt).file, example)
        return load_exported(path, device)


def markdown(rows: Sequence[Row]) -> str:
    """The table: model, format, batch, ms per call, dense ms, speedup, max |diff|, note."""
    lines = ["| model | format | batch | device, threads | ms / call | dense ms / call | speedup | max abs diff | note |",
             "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.note.startswith("refused"):
            lines.append(f"| {r.model} | {r.format} | {r.batch} | {r.device}, {r.threads} | — | — | — | — | {r.note} |")
            continue
        lines.append(f"| {r.model} | {r.format} | {r.batch} | {r.device}, {r.threads} | {r.seconds * 1e3:.3f} | "
                     f"{r.dense_seconds * 1e3:.3f} | **{r.speedup:.2f}×** | {r.max_abs_diff:.1e} | {r.note} |")
    return "\n".join(lines) + "\n"


def as_dicts(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
