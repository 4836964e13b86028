"""Training and evaluation on in-memory tensors, resumable at any epoch boundary.

Everything that decides the trajectory is a pure function of the iteration number: the
data order of epoch e is a permutation seeded by (order_seed, e), the learning rate is
computed from the iteration, and the optimizer state is saved with the weights. So
resuming from a checkpoint, or rewinding to iteration k and training on, replays exactly
the steps an uninterrupted run would take.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pai_core.data import DataBundle, Split
from pai_core.masks import Mask, MaskEnforcer
from pai_core.progress import get_progress
from pai_core.specs import TrainSpec
from pai_core.store import atomic_write, to_bytes

log = logging.getLogger("pai_core.training")

PROGRESS_EVERY = 50  # iterations between progress-bar updates


def resolve_device(name: str) -> torch.device:
    """`auto` = CUDA when present. On CUDA, deterministic kernels are switched on: resuming
    and rewinding are only exact if the same steps give the same numbers."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was asked for but torch sees no CUDA device")
        _deterministic_cuda()
    return torch.device(name)


def _deterministic_cuda() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def epoch_order(n: int, order_seed: int, epoch: int) -> torch.Tensor:
    """The example order of one epoch: depends on (seed, epoch) only, never on history."""
    g = torch.Generator().manual_seed((order_seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(n, generator=g)


def lr_at(it: int, spec: TrainSpec, ipe: int, total: int) -> float:
    """Learning rate at iteration `it` (0-based): warmup, then constant, step or cosine."""
    if spec.warmup_iterations and it < spec.warmup_iterations:
        return spec.lr * (it + 1) / spec.warmup_iterations
    if spec.lr_schedule == "step":
        passed = sum(it >= m for m in spec.milestone_iterations(ipe))
        return spec.lr * spec.gamma ** passed
    if spec.lr_schedule == "cosine":
        span = max(total - spec.warmup_iterations, 1)
        t = (it - spec.warmup_iterations) / span
        return 0.5 * spec.lr * (1 + math.cos(math.pi * min(t, 1.0)))
    return spec.lr


def make_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                           nesterov=spec.nesterov, weight_decay=spec.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1000) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy; restores the model's train/eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, len(split), batch_size):
        x, y = split.x[i:i + batch_size], split.y[i:i + batch_size]
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    n = max(len(split), 1)
    return {"loss": loss.item() / n, "acc": correct.item() / n}


class MaskUpdater(Protocol):
    """Changes the mask during training (SET/RigL regrowth, a gradual pruning ramp)."""

    def due(self, it: int) -> bool: ...
    def __call__(self, it: int, model: nn.Module, opt: torch.optim.Optimizer, mask: Mask) -> Mask: ...


@dataclass
class TrainOutcome:
    history: list[dict[str, float]] = field(default_factory=list)
    optimizer_state: dict[str, Any] | None = None
    iteration: int = 0
    mask: Mask | None = None


def train(
    model: nn.Module,
    data: DataBundle,
    spec: TrainSpec,
    *,
    batch_size: int,
    order_seed: int,
    mask: Mask | None = None,
    start_iter: int = 0,
    stop_iter: int | None = None,
    optimizer_state: dict[str, Any] | None = None,
    checkpoint: Path | None = None,
    eval_batch_size: int = 1000,
    label: str = "train",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    mask_updater: MaskUpdater | None = None,
) -> TrainOutcome:
    """Train from `start_iter` to `stop_iter` (default: the spec's length), masked.

    `data` must already be on the model's device. With `checkpoint`, the state is saved
    atomically at every epoch boundary and a run that finds one resumes from it.
    A `mask_updater` (dynamic sparse training) may replace the mask when it is `due`; it
    runs after backward, so it sees dense gradients, and before the masked step.
    """
    ipe = math.ceil(len(data.train) / batch_size)
    total = spec.total_iterations(ipe)
    stop = total if stop_iter is None else stop_iter
    opt = make_optimizer(model, spec)
    enforcer = MaskEnforcer(model, mask)
    history: list[dict[str, float]] = []
    it = start_iter
    if optimizer_state:
        opt.load_state_dict(optimizer_state)
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True, map_location=next(model.parameters()).device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        it, history = state["iteration"], state["history"]
        mask = state.get("mask", mask)
        enforcer = MaskEnforcer(model, mask)
        log.info("%s: resuming from checkpoint at iteration %d of %d", label, it, stop)
    enforcer.after_step()  # the starting point itself is masked: w' = m ⊙ w

    progress = get_progress()
    progress.start(label, stop, it)
    model.train()
    running, seen = torch.zeros((), device=data.train.x.device), 0
    order = None
    while it < stop:
        epoch, pos = divmod(it, ipe)
        if order is None or pos == 0:
            order = epoch_order(len(data.train), order_seed, epoch).to(data.train.x.device)
        idx = order[pos * batch_size:(pos + 1) * batch_size]
        lr = lr_at(it, spec, ipe, total)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if mask_updater is not None and mask_updater.due(it):
            mask = mask_updater(it, model, opt, mask)
            enforcer = MaskEnforcer(model, mask)
        enforcer.before_step()
        opt.step()
        enforcer.after_step()
        running += loss.detach()
        seen += 1
        it += 1
        if it % PROGRESS_EVERY == 0:
            progress.update(it)
        if it % ipe == 0 or it == stop:
            row = {"iteration": it, "epoch": it / ipe, "lr": lr,
                   "train_loss": (running / seen).item()}
            for split_name in ("val", "test"):
                for k, v in evaluate(model, getattr(data, split_name), eval_batch_size).items():
                    row[f"{split_name}_{k}"] = v
            history.append(row)
            running, seen = torch.zeros_like(running), 0
            if checkpoint is not None and it < stop:
                atomic_write(checkpoint, to_bytes({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                   "iteration": it, "history": history, "mask": mask}))
            if on_epoch:
                on_epoch(row)
            progress.update(it, val_acc=row["val_acc"])
    progress.finish()
    return TrainOutcome(history=history, optimizer_state=opt.state_dict(), iteration=it, mask=mask)


def best_val(history: list[dict[str, float]]) -> dict[str, float]:
    """The evaluation with the highest val accuracy (first on ties): LTH's early-stop point."""
    if not history:
        return {}
    best = max(history, key=lambda r: (r["val_acc"], -r["iteration"]))
    return {"iteration": best["iteration"], "val_acc": best["val_acc"], "test_acc": best["test_acc"]}
