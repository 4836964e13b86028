"""What does orchestration cost? The LTH flow against a plain PyTorch script.

Both do the same optimizer steps on the same in-memory MNIST tensors, batched by index:
dense training, then per round global magnitude pruning of 20 % of the survivors, rewind
to the init, masked retraining, and the random-reinit control; both evaluate val and
test after every epoch. The flow adds Prefect tasks, stage keys, hashed atomic
artifacts, per-epoch checkpoints and MLflow logging. Prefect's start-up (its temporary
server, measured on a no-op flow) is reported separately, as is importing the stack.

    python benchmarks/overhead.py                 # the full configs/lth/lenet300_mnist.yaml
    python benchmarks/overhead.py train.epochs=1  # any spec override, for a quick look
    python benchmarks/overhead.py --repeat 2      # A B B A: cancels this machine's drift
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

T_PROCESS = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pai_core import data as data_lib  # noqa: E402
from pai_core.models import build_model  # noqa: E402
from pai_core.plan import REINIT_SEED_OFFSET  # noqa: E402
from pai_core.spec_io import load_spec  # noqa: E402

CONFIG = ROOT / "configs/lth/lenet300_mnist.yaml"


# ---------------------------------------------------------------- the plain script

def plain_lth(spec) -> list[tuple[str, float, float]]:
    """LTH in plain PyTorch: no stages, no store, no tracking. Returns (round, sparsity, test acc)."""
    data = data_lib.load(spec.data.dataset, val_size=spec.data.val_size, split_seed=spec.data.split_seed)
    tr = spec.train
    bs, n = spec.data.batch_size, len(data.train)
    ipe = math.ceil(n / bs)
    total = tr.epochs * ipe

    def evaluate(model, split):
        model.eval()
        with torch.no_grad():
            correct = sum((model(split.x[i:i + 1000]).argmax(1) == split.y[i:i + 1000]).sum().item()
                          for i in range(0, len(split), 1000))
        model.train()
        return correct / len(split)

    def fit(model, masks):
        opt = torch.optim.Adam(model.parameters(), lr=tr.lr)
        pairs = [(p, masks[name].float()) for name, p in model.named_parameters() if name in masks]
        with torch.no_grad():
            for p, m in pairs:
                p.mul_(m)
        for it in range(total):
            epoch, pos = divmod(it, ipe)
            if pos == 0:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.order_seed * 1_000_003 + epoch))
            idx = order[pos * bs:(pos + 1) * bs]
            for g in opt.param_groups:
                g["lr"] = 0.5 * tr.lr * (1 + math.cos(math.pi * it / total))
            loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p, m in pairs:
                p.grad.mul_(m)
            opt.step()
            with torch.no_grad():
                for p, m in pairs:
                    p.mul_(m)
            if (it + 1) % ipe == 0:
                evaluate(model, data.val), evaluate(model, data.test)
        return evaluate(model, data.test)

    def new_model(seed):
        return build_model(spec.model.name, data.in_shape, data.num_classes, seed=seed)

    init = new_model(spec.seed).state_dict()
    model = new_model(spec.seed)
    names = [k for k, v in init.items() if k.endswith("weight") and v.dim() > 1]
    masks = {k: torch.ones_like(init[k], dtype=torch.bool) for k in names}
    rows = [("dense", 0.0, fit(model, {}))]
    count = sum(m.numel() for m in masks.values())
    for r in range(1, spec.prune.rounds + 1):
        weights = model.state_dict()
        scores = torch.cat([torch.where(masks[k], weights[k].abs(), torch.tensor(-1.0)).flatten() for k in names])
        keep = torch.zeros(count, dtype=torch.bool)
        keep[torch.sort(scores.double(), descending=True, stable=True).indices[:round(count * (1 - spec.prune.rate) ** r)]] = True
        masks = dict(zip(names, (k.view_as(masks[n]) for n, k in zip(names, torch.split(keep, [masks[n].numel() for n in names])))))
        sparsity = 1 - int(keep.sum()) / count
        model = new_model(spec.seed)
        model.load_state_dict(init)  # rewind to iteration 0
        rows.append((f"round {r}", sparsity, fit(model, masks)))
        if spec.prune.reinit_control:
            rows.append((f"round {r} reinit", sparsity, fit(new_model(spec.seed + REINIT_SEED_OFFSET), masks)))
    return rows


# ---------------------------------------------------------------------- the harness

def main(overrides: list[str], repeat: int) -> None:
    t_base = time.perf_counter() - T_PROCESS
    spec = load_spec(CONFIG, overrides)
    assert spec.train.optimizer == "adam" and spec.train.lr_schedule == "cosine" and spec.prune.rewind_iter == 0
    home = Path(tempfile.mkdtemp(prefix="pai-bench-"))
    os.environ["PAI_HOME"] = str(home)  # a fresh store: the flow computes everything
    # One tracking database for every run (created below, outside the timings); each flow
    # run gets a fresh artifact store so that it computes every stage.
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    data_lib.load(spec.data.dataset)  # provision once, outside both timings

    t = time.perf_counter()
    from prefect import flow

    from flows.lottery_ticket import lottery_ticket
    t_import = time.perf_counter() - t

    @flow(name="noop")
    def noop() -> None:
        pass

    t = time.perf_counter()
    noop()  # starts Prefect's temporary server unless PREFECT_API_URL points at one
    t_startup = time.perf_counter() - t

    from mlflow.tracking import MlflowClient

    from flows.env import tracking_uri

    t = time.perf_counter()
    MlflowClient(tracking_uri()).get_experiment_by_name(spec.experiment)  # creates the SQLite store
    t_mlflow = time.perf_counter() - t

    # This machine's speed drifts by tens of percent over minutes, so the two are run in
    # an interleaved A B B A order (each flow run on a fresh store) and the totals compared.
    t_plain, t_flow, t_stages = [], [], []
    for i, kind in enumerate(["plain", "flow", "flow", "plain"][: 2 * repeat] if repeat <= 2 else
                             ["plain", "flow", "flow", "plain"] * (repeat // 2)):
        data_lib.clear_cache()
        os.environ["PAI_HOME"] = str(home / f"run{i}")
        t = time.perf_counter()
        if kind == "flow":
            last_flow_home = os.environ["PAI_HOME"]
        if kind == "plain":
            plain = plain_lth(spec)
            t_plain.append(time.perf_counter() - t)
        else:
            summary = lottery_ticket(spec=spec)
            t_flow.append(time.perf_counter() - t)
            t_stages.append(sum(st["seconds"] for st in summary["stages"]))
            assert summary["reused"] == 0

    os.environ["PAI_HOME"] = last_flow_home
    t = time.perf_counter()
    rerun = lottery_ticket(spec=spec)
    t_rerun = time.perf_counter() - t

    from rich.console import Console
    from rich.table import Table

    server = os.environ.get("PREFECT_API_URL") or "temporary server"
    table = Table("measure", "seconds", title=f"LTH overhead, {spec.name} ({server}, torch threads {torch.get_num_threads()})")
    table.add_row("import torch + pai_core (before timing)", f"{t_base:.2f}")
    table.add_row("import prefect + mlflow + flows", f"{t_import:.2f}")
    table.add_row("Prefect start-up (first no-op flow)", f"{t_startup:.2f}")
    table.add_row("MLflow SQLite store creation (once per tracking database)", f"{t_mlflow:.2f}")
    table.add_row("plain PyTorch script, each run", " ".join(f"{x:.2f}" for x in t_plain))
    table.add_row("pai-flow lottery_ticket flow (all stages computed), each run", " ".join(f"{x:.2f}" for x in t_flow))
    table.add_row("[bold]ratio flow / plain (totals)[/bold]", f"[bold]{sum(t_flow) / sum(t_plain):.3f}[/bold]")
    # Within one flow run, drift cancels: the time outside the stage functions (Prefect
    # tasks, cache checks, MLflow) against the time inside them (training, store writes).
    table.add_row("flow: inside stage functions, each run", " ".join(f"{x:.2f}" for x in t_stages))
    table.add_row("[bold]flow: wall / inside stages[/bold]", f"[bold]{sum(t_flow) / sum(t_stages):.3f}[/bold]")
    table.add_row(f"re-run of the same flow ({rerun['computed']} computed, {rerun['reused']} reused)", f"{t_rerun:.2f}")
    Console().print(table)

    acc = Table("round", "sparsity plain", "sparsity flow", "test acc plain", "test acc flow",
                title="same steps, same numbers?")
    for (name, sp, ta), row in zip(plain, summary["rounds"]):
        acc.add_row(name, f"{sp:.4f}", f"{row['sparsity']:.4f}", f"{ta:.4f}", f"{row['test_acc']:.4f}")
    Console().print(acc)


if __name__ == "__main__":
    args = sys.argv[1:]
    reps = int(args.pop(args.index("--repeat") + 1)) if "--repeat" in args else 1
    if "--repeat" in args:
        args.remove("--repeat")
    main(args, reps)
