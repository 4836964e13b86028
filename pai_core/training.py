"""Training and evaluation on in-memory tensors, resumable at any epoch boundary.

Everything that decides the trajectory is a pure function of the iteration number: the
data order of epoch e is a permutation seeded by (order_seed, e), the learning rate is
computed from the iteration, and the optimizer state is saved with the weights. So
resuming from a checkpoint, or rewinding to iteration k and training on, replays exactly
the steps an uninterrupted run would take.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pai_core.data import DataBundle, Split
from pai_core.masks import Mask, MaskEnforcer
from pai_core.progress import Progress
from pai_core.specs import TrainSpec
from pai_core.store import load_checkpoint, save_checkpoint

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


class Callback:
    """One hook protocol for everything that rides along a training run. Every hook is optional.

    - `after_backward`: dense gradients exist, the step has not happened. May replace
      `state.mask` (SET/RigL regrowth, a gradual ramp) and set `state.skip_step`.
    - `on_step_end`: after the masked step (progress displays).
    - `on_epoch_end`: after evaluation, before the checkpoint. May set `state.stop` (an
      early-bird ticket was drawn): training then ends at this epoch.
    - `state_dict` / `load_state_dict`: what the callback must carry across a resume; it is
      saved in the checkpoint, so a resumed run decides exactly as an uninterrupted one.
    - `record`: what the stage stores in its info (`mask_updates`, `stopped_early`).
    """

    def on_start(self, state: TrainState) -> None: ...
    def after_backward(self, state: TrainState) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState, row: dict[str, float]) -> None: ...
    def on_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def record(self) -> dict[str, Any]:
        return {}


@dataclass
class TrainState:
    """What callbacks see and may change."""
    model: nn.Module
    opt: torch.optim.Optimizer
    mask: Mask | None
    it: int
    stop_iter: int
    total: int
    iterations_per_epoch: int
    stop: bool = False       # set by a callback: end after this epoch
    skip_step: bool = False  # set by a callback: no optimizer step this iteration


class ProgressCallback(Callback):
    """The CLI's bars (or any `Progress`), fed every PROGRESS_EVERY steps and each epoch."""

    def __init__(self, progress: Progress, label: str):
        self.progress, self.label = progress, label

    def on_start(self, state: TrainState) -> None:
        self.progress.start(self.label, state.stop_iter, state.it)

    def on_step_end(self, state: TrainState) -> None:
        if state.it % PROGRESS_EVERY == 0:
            self.progress.update(state.it)

    def on_epoch_end(self, state: TrainState, row: dict[str, float]) -> None:
        self.progress.update(state.it, val_acc=row["val_acc"])
        self.progress.epoch(row)

    def on_end(self, state: TrainState) -> None:
        self.progress.finish()


@dataclass
class TrainOutcome:
    history: list[dict[str, float]] = field(default_factory=list)
    optimizer_state: dict[str, Any] | None = None
    iteration: int = 0
    mask: Mask | None = None
    stopped_early: bool = False


def _resume(saved: Any, model: nn.Module, opt: torch.optim.Optimizer, callbacks: Sequence[Callback],
            start_iter: int, stop: int) -> dict[str, Any]:
    """Apply a checkpoint to the model, optimizer and callbacks, all or nothing: if it is not a
    checkpoint of this run, they are restored and the error re-raised (the checkpoint is set aside)."""
    before = copy.deepcopy((model.state_dict(), opt.state_dict(), [cb.state_dict() for cb in callbacks]))
    try:
        it, history, mask = saved["iteration"], saved["history"], saved.get("mask")
        if not (type(it) is int and start_iter < it < stop and isinstance(history, list)
                and (mask is None or isinstance(mask, dict))):
            raise ValueError(f"iteration {it!r} not in ({start_iter}, {stop}), or history/mask malformed")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        for cb, cb_state in zip(callbacks, saved.get("callbacks", [])):
            cb.load_state_dict(cb_state)
    except Exception:
        model.load_state_dict(before[0])
        opt.load_state_dict(before[1])
        for cb, cb_state in zip(callbacks, before[2]):
            cb.load_state_dict(cb_state)
        raise
    return saved


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
    callbacks: Sequence[Callback] = (),
) -> TrainOutcome:
    """Train from `start_iter` to `stop_iter` (default: the spec's length), masked.

    `data` must already be on the model's device. With `checkpoint`, the state is saved
    atomically at every epoch boundary and a run that finds one resumes from it.
    """
    ipe = math.ceil(len(data.train) / batch_size)
    total = spec.total_iterations(ipe)
    stop = total if stop_iter is None else stop_iter
    opt = make_optimizer(model, spec)
    history: list[dict[str, float]] = []
    it = start_iter
    if optimizer_state:
        opt.load_state_dict(optimizer_state)
    saved = None if checkpoint is None else load_checkpoint(  # a bad one is set aside: start over
        checkpoint, next(model.parameters()).device, lambda s: _resume(s, model, opt, callbacks, start_iter, stop))
    if saved is not None:
        it, history, mask = saved["iteration"], saved["history"], saved.get("mask", mask)
        log.info("resuming from checkpoint at iteration %d of %d", it, stop)
    state = TrainState(model, opt, mask, it, stop, total, ipe)
    enforcer = MaskEnforcer(model, mask)
    enforcer.after_step()  # the starting point itself is masked: w' = m ⊙ w
    for cb in callbacks:
        cb.on_start(state)

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
        state.it, state.skip_step, before = it, False, state.mask
        for cb in callbacks:
            cb.after_backward(state)
        if state.mask is not before:
            enforcer = MaskEnforcer(model, state.mask)
        enforcer.before_step()
        if not state.skip_step:
            opt.step()
        enforcer.after_step()
        running += loss.detach()
        seen += 1
        it += 1
        state.it = it
        for cb in callbacks:
            cb.on_step_end(state)
        if it % ipe == 0 or it == stop:
            row = {"iteration": it, "epoch": it / ipe, "lr": lr,
                   "train_loss": (running / seen).item()}
            for split_name in ("val", "test"):
                for k, v in evaluate(model, getattr(data, split_name), eval_batch_size).items():
                    row[f"{split_name}_{k}"] = v
            history.append(row)
            running, seen = torch.zeros_like(running), 0
            for cb in callbacks:
                cb.on_epoch_end(state, row)
            if state.stop:
                break
            if checkpoint is not None and it < stop:
                save_checkpoint(checkpoint, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": it,
                    "history": history, "mask": state.mask, "callbacks": [cb.state_dict() for cb in callbacks]})
    for cb in callbacks:
        cb.on_end(state)
    return TrainOutcome(history=history, optimizer_state=opt.state_dict(), iteration=it, mask=state.mask,
                        stopped_early=state.stop)


def best_val(history: list[dict[str, float]]) -> dict[str, float]:
    """The evaluation with the highest val accuracy (first on ties): LTH's early-stop point."""
    if not history:
        return {}
    best = max(history, key=lambda r: (r["val_acc"], -r["iteration"]))
    return {"iteration": best["iteration"], "val_acc": best["val_acc"], "test_acc": best["test_acc"]}
