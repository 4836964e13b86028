"""Where a 2:4 Linear's time goes on a CUDA GPU: the ways torch can run one, side by side.

torch's `_cslt_sparse_mm` builds and destroys its cuSPARSELt descriptors and plan on every call
(torch 2.11-2.14); on a 4096 x 4096 layer that host-side setup can outweigh the kernel. This
table separates the kernel from the setup: each path eagerly and replayed from a CUDA graph
(which replays the kernels alone), against dense float16 timed the same way; then the whole exported
2:4 MLP beside its dense twin, timed and kernel by kernel (torch.profiler). Needs a CUDA GPU of compute
capability >= 8.0; prints why not otherwise.

    python benchmarks/two_four_paths.py [--width 4096] [--batches 64,1024,4096] [--json F] [--profile-batch B[,B]]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pai_core import semi_structured  # noqa: E402
from pai_core.sparse_layers import SemiStructuredLinear  # noqa: E402


def cuda_ms(fn: Callable[[], object], iters: int, warmup: int) -> float:
    """Median over `iters` of one call's CUDA-event time (host setup included: events bracket it)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` captured once into a CUDA graph; the returned callable replays its kernels."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def two_four_weight(width: int) -> torch.Tensor:
    w = torch.randn(width, width, device="cuda", dtype=torch.float16)
    keep = w.abs().reshape(width, -1, 4).topk(2, dim=-1).indices
    mask = torch.zeros_like(w, dtype=torch.bool).reshape(width, -1, 4).scatter_(-1, keep, True).reshape(width, width)
    return w * mask


def paths(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The ways to compute x @ w.T that this table compares (then two layers with bias `b`); a
    path torch refuses is left out (printed)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    out: dict[str, Callable[[], object]] = {"dense fp16": lambda: F.linear(x, w)}
    compressed = to_sparse_semi_structured(w)
    layer = SemiStructuredLinear(compressed.packed, None, w.shape[1], w.shape[0], w.shape[1]).cuda()
    out["pai SemiStructuredLinear"] = lambda: layer(x)
    out["torch to_sparse_semi_structured"] = lambda: F.linear(x, compressed)
    xt = x.t()
    out["_cslt_sparse_mm alg 0"] = lambda: torch._cslt_sparse_mm(compressed.packed, xt)
    try:
        alg = torch._cslt_sparse_mm_search(compressed.packed, xt)
        alg = alg[0] if isinstance(alg, tuple) else int(alg)
        out[f"_cslt_sparse_mm alg {alg} (searched)"] = lambda: torch._cslt_sparse_mm(compressed.packed, xt, alg_id=alg)
    except Exception as e:  # noqa: BLE001 - a diagnostic: say what failed and go on
        print(f"  search refused: {type(e).__name__}: {e}")
    xc = xt.contiguous()  # the operand a 2:4 layer gets from the 2:4 layer before it
    try:
        alg_c = torch._cslt_sparse_mm_search(compressed.packed, xc)
        alg_c = alg_c[0] if isinstance(alg_c, tuple) else int(alg_c)
        out[f"_cslt_sparse_mm contiguous operand alg {alg_c}"] = (
            lambda: torch._cslt_sparse_mm(compressed.packed, xc, alg_id=alg_c))
    except Exception as e:  # noqa: BLE001
        print(f"  search (contiguous operand) refused: {type(e).__name__}: {e}")
    try:
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
        cutlass = to_sparse_semi_structured(w)
        out["CUTLASS backend"] = lambda: F.linear(x, cutlass)
    except Exception as e:  # noqa: BLE001
        print(f"  CUTLASS refused: {type(e).__name__}: {e}")
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
    # two layers with bias, ReLU between, as in an exported MLP: the second 2:4 layer reads the
    # first's transposed view; the bias added after the product, or in cuSPARSELt's epilogue
    out["dense 2 layers (bias, relu)"] = lambda: F.linear(F.relu(F.linear(x, w, b)), w, b)
    for fuse in (False, True):
        tuned = SemiStructuredLinear(compressed.packed, b, w.shape[1], w.shape[0], w.shape[1], fuse_bias=fuse).cuda()
        semi_structured.tune(tuned, [x.shape[0]])
        out[f"pai 2 layers, tuned{', bias fused' if fuse else ''}"] = lambda t=tuned: t(F.relu(t(x)))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--batches", default="64,1024,4096")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json", type=Path)
    p.add_argument("--profile-batch", default="1024",
                   help="then the exported MLP at these batches (comma-separated) beside dense float16, timed and "
                        "profiled (0: skip)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        print("2:4 paths: not measured (no CUDA device with compute capability >= 8.0 here)")
        return []
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}, "
          f"cuSPARSELt {torch.backends.cusparselt.version()}; {args.width} x {args.width} float16 weight, 2:4")
    torch.manual_seed(0)
    w = two_four_weight(args.width)
    bias = torch.randn(args.width, device="cuda", dtype=torch.float16)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, args.width, device="cuda", dtype=torch.float16)
        ref = F.linear(x, w).float()
        ref2 = F.linear(F.relu(F.linear(x, w, bias)), w, bias).float()
        fns = paths(w, bias, x)
        for mode in ("eager", "cuda graph"):  # every eager path first: a failed capture cannot spoil them
            dense = float("nan")
            for name, fn in fns.items():
                try:
                    ms = cuda_ms(fn if mode == "eager" else graphed(fn), args.iters, args.warmup)
                    y = fn()
                    y = y.t() if name.startswith("_cslt") else y
                    err = float((y.float() - (ref2 if "2 layers" in name else ref)).abs().max())
                except Exception as e:  # noqa: BLE001 - a diagnostic: say what failed and go on
                    print(f"  batch {batch} {name} {mode}: refused: {type(e).__name__}: {str(e)[:160]}")
                    continue
                dense = ms if name.startswith("dense") else dense  # the 2-layer rows: vs dense 2 layers
                rows.append({"batch": batch, "path": name, "mode": mode, "ms": ms, "dense_ms": dense,
                             "speedup": dense / ms, "max_abs_diff": err})
                print(f"  batch {batch:5d}  {name:36s} {mode:10s} {ms:8.4f} ms  vs dense {dense:8.4f} ms  "
                      f"{dense / ms:5.2f}x  max|diff| {err:.1e}", flush=True)
                if args.json:  # as it goes: a kernel that kills the process leaves the rows before it
                    args.json.write_text(json.dumps(rows, indent=1))
    for batch in (int(b) for b in args.profile_batch.split(",") if int(b)):
        rows += exported_mlp(args.width, batch, args.iters, args.warmup)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    return rows


def exported_mlp(width: int, batch: int, iters: int, warmup: int, calls: int = 10) -> list[dict]:
    """The exported 2:4 MLP (benchmarks/speedup.py's, head dense) against the same net dense in
    float16, replayed from CUDA graphs, with the bias added after each product (the export's
    default) and fused into cuSPARSELt's epilogue; then each one's GPU kernels (torch.profiler):
    where the whole net's time goes, kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    from pai_core.export import build, masked_copy
    from pai_core.masks import prunable_names
    from pai_core.selection import select_nm
    from pai_core.sparse_layers import HalfPrecision
    from speedup import wide_mlp

    mlp = wide_mlp(width)
    params = dict(mlp.named_parameters())
    names = prunable_names(mlp)[:-1]
    mask = select_nm({n: params[n].detach().abs() for n in names},
                     {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}, 2, 4)
    x = torch.randn(batch, width, device="cuda")
    dense = HalfPrecision(masked_copy(mlp, mask).half()).cuda().eval()
    export = build("semi_structured", mlp, mask, x, device="cuda", tune_batches=[batch])
    layers = [m for m in export.modules() if isinstance(m, SemiStructuredLinear)]
    rows, dense_ms = [], float("nan")
    with torch.inference_mode():
        ref = dense(x).float()
        for label, fuse in (("dense float16", None), ("2:4 export", False), ("2:4 export, bias fused", True)):
            net = dense if fuse is None else export
            for m in layers:
                m.fuse_bias = bool(fuse)
            try:
                ms = cuda_ms(graphed(lambda: net(x)), iters, warmup)
                err = float((net(x).float() - ref).abs().max())
            except Exception as e:  # noqa: BLE001 - a diagnostic: say what failed and go on
                print(f"  exported MLP, batch {batch}, {label}: refused: {type(e).__name__}: {str(e)[:160]}")
                continue
            dense_ms = ms if fuse is None else dense_ms
            rows.append({"batch": batch, "path": f"MLP {width}x3+head: {label}", "mode": "cuda graph", "ms": ms,
                         "dense_ms": dense_ms, "speedup": dense_ms / ms, "max_abs_diff": err})
            print(f"  exported MLP, batch {batch}, {label:24s} cuda graph {ms:8.4f} ms  {dense_ms / ms:5.2f}x  "
                  f"max|diff| vs dense fp16 {err:.1e}", flush=True)
            for _ in range(5):
                net(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    net(x)
                torch.cuda.synchronize()
            print(f"\n{label}, batch {batch}, {calls} eager calls: kernels by GPU time")
            print(prof.key_averages().table(sort_by="device_time_total", row_limit=12, max_name_column_width=70))
    return rows


if __name__ == "__main__":
    main()
