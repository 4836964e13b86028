"""The figures of the README's early-bird / LR-rewinding table: LR rewinding against weight
rewinding (to 0 and to iteration k) on LeNet-300-100 / MNIST and Conv-2 / Fashion-MNIST, and
early-bird tickets against the ticket drawn from the fully trained net.

Runs in this process through the one executor (no Prefect, no MLflow), on the store under
$PAI_HOME, so a second run only prints. Usage:
    python benchmarks/rewinding_and_early_bird.py [--seeds 0 1] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pai_core.executor import run_specs  # noqa: E402
from pai_core.paths import pai_home  # noqa: E402
from pai_core.spec_io import load_spec  # noqa: E402
from pai_core.store import Store  # noqa: E402

C = ROOT / "configs"
FASHION_EB = ["model.width=0.125", "train.epochs=8"]  # the config at half its width and 2/3 its length
FASHION_CONV = ["model.name=conv2", "model.width=0.25", "data.dataset=fashion_mnist", "data.batch_size=64",
                "train.optimizer=adam", "train.lr=0.001", "train.epochs=4", "train.lr_schedule=cosine"]


def experiments(rounds: int) -> list[tuple[str, str, Path, list[str]]]:
    it = f"prune.rounds={rounds}"
    return [
        ("MNIST LeNet-300-100", "weight rewinding to 0 (LTH)", C / "lth/lenet300_mnist.yaml",
         [it, "prune.reinit_control=false"]),
        ("MNIST LeNet-300-100", "weight rewinding to 500", C / "lth/lenet300_mnist.yaml",
         [it, "prune.reinit_control=false", "prune.rewind_iter=500"]),
        ("MNIST LeNet-300-100", "LR rewinding to 0", C / "lr_rewinding/lenet300_mnist.yaml", [it]),
        ("Fashion Conv-2/4", "weight rewinding to 0 (LTH)", C / "lth/lenet300_mnist.yaml",
         [it, "prune.reinit_control=false", "prune.rate=0.4", *FASHION_CONV]),
        ("Fashion Conv-2/4", "LR rewinding to 0", C / "lr_rewinding/lenet300_mnist.yaml",
         [it, "prune.rate=0.4", *FASHION_CONV]),
        ("MNIST LeNet-300-100", "early-bird, unstructured 90 %", C / "early_bird/lenet300_mnist.yaml", []),
        ("MNIST LeNet-300-100", "ticket of the fully trained net, 90 %", C / "early_bird/lenet300_mnist.yaml",
         ["early_bird.epsilon=1e-9"]),
        ("Fashion Conv-2/8 BN", "early-bird, 50 % of channels", C / "early_bird/conv2_fashion.yaml", FASHION_EB),
        ("Fashion Conv-2/8 BN", "ticket of the fully trained net, 50 % of channels",
         C / "early_bird/conv2_fashion.yaml", [*FASHION_EB, "early_bird.epsilon=1e-9"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fashion-seeds", type=int, nargs="+", default=None,
                    help="seeds of the Fashion-MNIST conv rows (default: --seeds); they take ~8x longer")
    args = ap.parse_args()
    store = Store(pai_home() / "store")
    rows = []
    for setting, method, path, over in experiments(args.rounds):
        seeds = args.fashion_seeds if setting.startswith("Fashion") and args.fashion_seeds else args.seeds
        specs = [load_spec(path, [*over, f"seed={s}"]) for s in seeds]
        t0 = time.perf_counter()
        out = run_specs(specs, store)
        if out.errors:
            raise next(iter(out.errors.values()))
        from pai_core.paradigms import build_plan

        plans = [build_plan(s) for s in specs]
        for r in range(1, len(plans[0].rounds)):
            evs = [out.refs[p.rounds[r].evaluate.key].info for p in plans]
            accs = [e.test_acc * 100 for e in evs]
            extra = ""
            mask_ref = out.refs.get(plans[0].rounds[r].mask.key)
            if mask_ref is not None and getattr(mask_ref.info, "stopped_early", None):
                eb = [out.refs[p.rounds[r].mask.key].info.stopped_early for p in plans]
                extra = "ticket at epoch " + "/".join(str(e["epoch"]) for e in eb) + ", pretraining saved " + \
                        "/".join(f"{100 * e['saved']:.0f} %" for e in eb)
            dense = [out.refs[p.rounds[0].evaluate.key].info.test_acc * 100 for p in plans]
            rows.append((setting, method, plans[0].rounds[r].name, statistics.fmean(e.sparsity for e in evs),
                         statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else float("nan"),
                         statistics.fmean(dense), extra))
        print(f"{setting} / {method}: {time.perf_counter() - t0:.0f} s, {out.computed} stages computed", flush=True)
    print(f"\nseeds {args.seeds} (Fashion: {args.fashion_seeds or args.seeds}); test accuracy %, mean ± std over seeds")
    print("| setting | method | round | sparsity | test acc | dense | |\n|---|---|---|---|---|---|---|")
    for setting, method, rnd, sp, m, s, d, extra in rows:
        print(f"| {setting} | {method} | {rnd} | {100 * sp:.1f} % | {m:.2f} ± {s:.2f} | {d:.2f} | {extra} |")


if __name__ == "__main__":
    main()
