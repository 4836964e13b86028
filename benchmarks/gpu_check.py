"""CUDA path check: run on a machine with a GPU (`python benchmarks/gpu_check.py`).

Runs an LTH plan (conv net, late rewinding, reinit control) through pai_core with
`device: auto`, then checks what must hold on any device: exact mask counts, pruned
weights exactly zero in the stored (CPU-loaded) artifacts, a re-run computing nothing,
and whether a split run (rewind to k, train on) replays the uninterrupted one bit for bit.
Prints one line per check and a small timing table; exits non-zero if a check fails.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pai_core.data import DataBundle, Split, load  # noqa: E402
from pai_core.models import build_model  # noqa: E402
from pai_core.selection import nm_view  # noqa: E402
from pai_core.paradigms import build_plan  # noqa: E402
from pai_core.spec_io import parse_spec  # noqa: E402
from pai_core.specs import TrainSpec  # noqa: E402
from pai_core.stages import Runtime, run_plan  # noqa: E402
from pai_core.store import Store  # noqa: E402
from pai_core.determinism import resolve_device  # noqa: E402
from pai_core.training import train  # noqa: E402

# Every other paradigm's CUDA path: plan runs on the GPU, a re-run computes nothing.
BASE = {"seed": 0, "device": "auto", "model": {"name": "lenet_300_100"},
        "data": {"dataset": "synthetic", "batch_size": 50},
        "train": {"optimizer": "adam", "lr": 0.01, "epochs": 3}}
VARIANTS = {
    "prune_at_init synflow x20": {"flow": "prune_at_init", "prune": {"criterion": "synflow", "sparsity": 0.99, "rounds": 20}},
    "prune_at_init grasp": {"flow": "prune_at_init", "prune": {"criterion": "grasp", "schedule": "one_shot", "sparsity": 0.9}},
    "dynamic rigl": {"flow": "dynamic_sparse", "dynamic": {"method": "rigl", "update_interval": 5},
                     "prune": {"criterion": "random", "schedule": "one_shot", "sparsity": 0.9, "scope": "erk"}},
    "dynamic set": {"flow": "dynamic_sparse", "dynamic": {"method": "set", "update_interval": 5},
                    "prune": {"criterion": "random", "schedule": "one_shot", "sparsity": 0.9, "scope": "erk"}},
    "supermask edge_popup": {"flow": "supermask", "selection": {"method": "edge_popup", "keep": 0.3}},
    "supermask sampled": {"flow": "supermask", "train": {"optimizer": "adam", "lr": 0.1, "epochs": 3},
                          "selection": {"method": "supermask"}},
    "pat gradual": {"flow": "prune_after_training", "retrain": {"optimizer": "adam", "lr": 0.001, "epochs": 2},
                    "prune": {"schedule": "gradual", "sparsity": 0.8, "gradual": {"every": 5}}},
    "lr_rewinding": {"flow": "lr_rewinding", "prune": {"rate": 0.5, "rounds": 2, "lr_rewind_iter": 5}},
    "early_bird channel": {"flow": "early_bird", "model": {"name": "conv2", "width": 0.25, "batch_norm": True},
                           "prune": {"sparsity": 0.5}, "early_bird": {"window": 2, "epsilon": 0.5}},
    "early_bird unstructured": {"flow": "early_bird", "prune": {"sparsity": 0.8},
                                "early_bird": {"structure": "unstructured", "window": 2}},
    "pat structured conv2": {"flow": "prune_after_training", "model": {"name": "conv2"},
                             "train": {"optimizer": "adam", "lr": 0.001, "epochs": 3},
                             "retrain": {"optimizer": "adam", "lr": 0.001, "epochs": 1},
                             "prune": {"schedule": "one_shot", "sparsity": 0.5, "scope": "layerwise",
                                       "structure": "filter"}},
    # added after the first H200 run: methods whose CUDA paths had not run on a GPU yet
    "supermask iterand": {"flow": "supermask", "selection": {"method": "iterand", "keep": 0.5,
                                                             "rerandomize": {"every": 20, "rate": 0.1}}},
    "dynamic mest em_s": {"flow": "dynamic_sparse", "dynamic": {"method": "mest", "params": {"variant": "em_s"}},
                          "prune": {"criterion": "random", "schedule": "one_shot", "sparsity": 0.9, "scope": "erk"}},
    "dynamic granet": {"flow": "dynamic_sparse", "dynamic": {"method": "granet",
                                                             "params": {"initial_density": 0.5, "interval": 10}},
                       "prune": {"criterion": "random", "schedule": "one_shot", "sparsity": 0.9, "scope": "erk"}},
    "dynamic topkast": {"flow": "dynamic_sparse", "dynamic": {"method": "topkast", "params": {"update_interval": 5}},
                        "prune": {"criterion": "random", "schedule": "one_shot", "sparsity": 0.9, "scope": "erk"}},
    "dynamic snfs": {"flow": "dynamic_sparse", "dynamic": {"method": "snfs"},
                     "prune": {"criterion": "random", "schedule": "one_shot", "sparsity": 0.9, "scope": "erk"}},
    "dynamic dsr": {"flow": "dynamic_sparse", "dynamic": {"method": "dsr", "params": {"interval": 10}},
                    "prune": {"criterion": "random", "schedule": "one_shot", "sparsity": 0.9, "scope": "erk"}},
    "dynamic deepr": {"flow": "dynamic_sparse", "dynamic": {"method": "deepr"},
                      "prune": {"criterion": "random", "schedule": "one_shot", "sparsity": 0.9, "scope": "erk"}},
    "prune_at_init prospr": {"flow": "prune_at_init", "prune": {"criterion": "prospr", "schedule": "one_shot",
                                                                "sparsity": 0.9, "params": {"meta_steps": 2}}},
    "prune_at_init force": {"flow": "prune_at_init", "prune": {"criterion": "force", "sparsity": 0.95,
                                                               "rounds": 5}},
    "supermask biprop": {"flow": "supermask", "selection": {"method": "biprop", "keep": 0.5}},
    "prune_at_init phew": {"flow": "prune_at_init", "prune": {"criterion": "phew", "schedule": "one_shot",
                                                              "sparsity": 0.95}},
    "prune_at_init ntk_sap x3": {"flow": "prune_at_init", "prune": {"criterion": "ntk_sap", "sparsity": 0.95,
                                                                    "rounds": 3, "params": {"samples": 2}}},
    "pat lamp x2 adamw": {"flow": "prune_after_training", "train": {"optimizer": "adamw", "lr": 0.001, "epochs": 3,
                                                                   "weight_decay": 0.01},
                          "retrain": {"optimizer": "adamw", "lr": 0.001, "epochs": 1},
                          "prune": {"criterion": "lamp", "schedule": "iterative", "rate": 0.5, "rounds": 2}},
    "pat hrank conv2 filters": {"flow": "prune_after_training", "model": {"name": "conv2", "batch_norm": True},
                                "train": {"optimizer": "adam", "lr": 0.001, "epochs": 3},
                                "retrain": {"optimizer": "adam", "lr": 0.001, "epochs": 1},
                                "prune": {"criterion": "hrank", "schedule": "one_shot", "sparsity": 0.5,
                                          "scope": "layerwise", "structure": "filter"}},
    "early_bird resnet20 channels": {"flow": "early_bird", "model": {"name": "resnet20", "width": 0.25},
                                     "train": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "epochs": 3},
                                     "prune": {"sparsity": 0.3, "physical": True},
                                     "early_bird": {"window": 2, "epsilon": 0.5}},
    # added with SR-STE: the N:M chosen on the device every step, rows and conv channel groups
    "dynamic sr_ste 2:4": {"flow": "dynamic_sparse", "dynamic": {"method": "sr_ste"},
                           "prune": {"criterion": "magnitude", "schedule": "one_shot", "structure": "nm"}},
    "dynamic sr_ste conv2 channels 1:4": {"flow": "dynamic_sparse", "model": {"name": "conv2", "width": 0.25},
                                          "dynamic": {"method": "sr_ste", "params": {"update_interval": 2}},
                                          "prune": {"criterion": "magnitude", "schedule": "one_shot",
                                                    "structure": "nm", "n": 1, "m": 4, "nm_groups": "channels",
                                                    "nm_indivisible": "dense"}},
}

failures: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    if not ok:
        failures.append(name)


def on(device: torch.device, b: DataBundle) -> DataBundle:
    mv = lambda s: Split(s.x.to(device), s.y.to(device))  # noqa: E731
    return DataBundle(b.name, mv(b.train), mv(b.val), mv(b.test), b.in_shape, b.num_classes)


def main() -> None:
    if sys.argv[1:] == ["--list"]:  # parse and plan every variant, run nothing (tests/test_gpu_throughput.py)
        for label, over in VARIANTS.items():
            print(label, len(build_plan(parse_spec({**BASE, **over})).nodes), "stages")
        return
    only = sys.argv[2] if sys.argv[1:2] == ["--only"] else None  # `--only TEXT`: those variants alone
    if only is not None:
        run_variants({k: v for k, v in VARIANTS.items() if only in k}, resolve_device("auto"))
        print("FAILED: " + ", ".join(failures) if failures else "ALL CHECKS PASSED")
        sys.exit(1 if failures else 0)
    print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
    dev = resolve_device("auto")
    check("device auto picks cuda", dev.type == "cuda", str(dev))

    for model in ("lenet_300_100", "conv4"):
        spec = parse_spec({
            "flow": "lottery_ticket", "device": "auto", "seed": 0, "model": {"name": model},
            "data": {"dataset": "synthetic", "batch_size": 50},
            "train": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "epochs": 3},
            "prune": {"schedule": "iterative", "rate": 0.5, "rounds": 3, "rewind_iter": 7, "reinit_control": True}})
        plan = build_plan(spec)
        store = Store(tempfile.mkdtemp())
        rt = Runtime(store, "auto")
        t = time.perf_counter()
        refs = run_plan(plan.nodes, rt)
        elapsed = time.perf_counter() - t
        check(f"{model}: every stage computed on {dev}", len(rt.computed) == len(plan.nodes), f"{elapsed:.1f} s")
        for rnd in plan.rounds[1:]:
            mask = store.load(refs[rnd.mask.key])["mask"]
            n = sum(m.numel() for m in mask.values())
            kept = sum(int(m.sum()) for m in mask.values())
            weights = store.load(refs[rnd.trained.key])["model"]
            leaked = sum(int(torch.count_nonzero(weights[k][~m])) for k, m in mask.items())
            check(f"{model} {rnd.name}: exact count, pruned weights zero",
                  kept == round(n * rnd.density) and leaked == 0, f"kept {kept}/{n}, leaked {leaked}, "
                  f"test acc {refs[rnd.evaluate.key].info.test_acc:.3f}")
        rt2 = Runtime(Store(store.root), "auto")
        run_plan(plan.nodes, rt2)
        check(f"{model}: re-run computes nothing", rt2.computed == [])

    run_variants(VARIANTS, dev)
    tail_checks(dev)


def run_variants(variants: dict[str, dict], dev: torch.device) -> None:
    """Each variant's plan on the device, then again from its store: nothing may be computed."""
    for label, over in variants.items():
        spec = parse_spec({**BASE, **over})
        plan = build_plan(spec)
        store = Store(tempfile.mkdtemp())
        try:
            t = time.perf_counter()
            refs = run_plan(plan.nodes, Runtime(store, "auto"))
            last = refs[plan.rounds[-1].evaluate.key].info
            rt2 = Runtime(Store(store.root), "auto")
            run_plan(plan.nodes, rt2)
            check(f"{label}: runs on {dev}, re-run computes nothing", rt2.computed == [],
                  f"sparsity {last.sparsity:.3f}, test acc {last.test_acc:.3f}, {time.perf_counter() - t:.1f} s")
            if getattr(spec.prune, "structure", None) == "nm":  # every group of the final mask exactly n of m
                p = spec.prune
                mask = store.load(refs[plan.rounds[-1].trained.key])["mask"]
                ok = all((nm_view(k, p.nm_groups).reshape(-1, p.m).sum(1) == p.n).all() for k in mask.values()
                         if k.dim() > 1 and not k.all())
                check(f"{label}: the final mask is exactly {p.n}:{p.m} ({p.nm_groups})", ok)
        except Exception as e:  # report and go on: one script, every path
            check(f"{label}: runs on {dev}", False, repr(e)[:300])


def tail_checks(dev: torch.device) -> None:
    """A split run against an uninterrupted one on the device, and an epoch's time, CPU vs GPU."""
    data = on(dev, load("synthetic"))
    tr = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, epochs=3, lr_schedule="cosine")
    full = build_model("conv4", data.in_shape, data.num_classes, seed=0).to(dev)
    train(full, data, tr, batch_size=50, order_seed=0)
    part = build_model("conv4", data.in_shape, data.num_classes, seed=0).to(dev)
    first = train(part, data, tr, batch_size=50, order_seed=0, stop_iter=23)
    train(part, data, tr, batch_size=50, order_seed=0, start_iter=23, optimizer_state=first.optimizer_state)
    diff = max((a - b).abs().max().item() for a, b in zip(full.state_dict().values(), part.state_dict().values()))
    print(f"INFO  split run vs uninterrupted on {dev}: max |diff| = {diff:.3g} "
          f"({'bit-identical' if diff == 0 else 'cuDNN/cuBLAS are not bitwise deterministic here'})")

    # Throughput: LeNet-300-100 over MNIST-sized tensors, one epoch, GPU vs CPU.
    g = torch.Generator().manual_seed(0)
    mk = lambda n: Split(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))  # noqa: E731
    fake = DataBundle("fake", mk(55000), mk(5000), mk(10000), (1, 28, 28), 10)
    for d in (torch.device("cpu"), dev):
        m = build_model("lenet_300_100", (1, 28, 28), 10, seed=0).to(d)
        b = on(d, fake)
        t = time.perf_counter()
        train(m, b, TrainSpec(optimizer="adam", lr=1e-3, epochs=1), batch_size=60, order_seed=0)
        if d.type == "cuda":
            torch.cuda.synchronize()
        print(f"INFO  lenet_300_100, one MNIST-sized epoch (917 steps + eval) on {d}: {time.perf_counter() - t:.2f} s")
    print("FAILED: " + ", ".join(failures) if failures else "ALL CHECKS PASSED")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
