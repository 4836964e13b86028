"""What does the Dask sweep buy? The same sweep, sequential in one process against a
2-worker Dask LocalCluster, each on a fresh artifact store, side by side in one run.

The sweep is configs/sweeps/criteria_lenet300.yaml (real MNIST, LeNet-300-100, SNIP /
GraSP / SynFlow × 3 sparsities), shortened for a benchmark: one seed and `--epochs`
epochs each (default 2). Both modes run the same 22 distinct stages (the dense network is
trained once in each). The sequential run trains with all cores in one process; each Dask
worker trains with cores / workers threads, so the comparison is at equal total threads.

    python benchmarks/sweep.py                 # sequential, then Dask
    python benchmarks/sweep.py --repeat 2      # A B B A: cancels this machine's drift
    python benchmarks/sweep.py --epochs 5 --workers 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs/sweeps/criteria_lenet300.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="A B (B A ...) pairs")
    args = ap.parse_args()

    import flows  # noqa: F401  (environment defaults before Prefect loads)
    from prefect.testing.utilities import prefect_test_harness
    from rich.console import Console
    from rich.table import Table

    from flows.sweep import sweep
    from pai_core.sweep import load_sweep

    base = load_sweep(CONFIG)
    spec = base.model_copy(update={
        "grid": {k: v for k, v in base.grid.items() if k != "seed"},
        "base": [b.model_copy(update={"train": b.train.model_copy(update={"epochs": args.epochs})}) for b in base.base],
        "dask": base.dask.model_copy(update={"workers": args.workers}),
    })
    pair = ["sequential", "dask"]
    order = [m for i in range(args.repeat) for m in (pair if i % 2 == 0 else pair[::-1])]
    times: dict[str, list[float]] = {"sequential": [], "dask": []}
    executed: dict[str, dict] = {}
    with prefect_test_harness(server_startup_timeout=120):
        for mode in order:
            with tempfile.TemporaryDirectory() as home:
                os.environ["PAI_HOME"] = home
                t0 = time.perf_counter()
                summary = sweep(sweep=spec, sequential=(mode == "sequential"))
                times[mode].append(time.perf_counter() - t0)
                executed[mode] = summary["executed"]
                print(f"{mode}: {times[mode][-1]:.1f} s, executed {summary['executed']}", flush=True)
    assert executed["sequential"] == executed["dask"], "both modes must run the same stages"

    table = Table("mode", "wall (s), each run", "mean (s)", "stages run", title=(
        f"sweep {spec.name}: {len(spec.expand())} specs, {args.epochs} epochs, {os.cpu_count()} cores, "
        f"Dask LocalCluster of {args.workers}"))
    for mode, ts in times.items():
        table.add_row(mode, ", ".join(f"{t:.1f}" for t in ts), f"{statistics.fmean(ts):.1f}",
                      str(sum(executed[mode].values())))
    Console().print(table)
    ratio = statistics.fmean(times["sequential"]) / statistics.fmean(times["dask"])
    print(f"speed-up of Dask over sequential: {ratio:.2f}x  (pretrain once in each: "
          f"{executed['dask'].get('pretrain', 0)} dense training, {executed['dask'].get('init', 0)} init)")


if __name__ == "__main__":
    main()
