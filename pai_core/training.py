"""Training and evaluation on in-memory tensors, resumable at any epoch boundary.

Everything that decides the trajectory is a pure function of the iteration number: the
data order of epoch e is a permutation seeded by (order_seed, e), the augmentation of
iteration i is drawn from a generator seeded by (order_seed, i) (pai_core.augment), the
learning rate is computed from the iteration, and the optimizer state is saved with the
weights. So resuming from a checkpoint, or rewinding to iteration k and training on,
replays exactly the steps an uninterrupted run would take; on CUDA only with deterministic
kernels (`train.deterministic`, the default).

The step loop never waits for the device: the loss is summed on it and read once per epoch,
and augmentation draws reach it by non-blocking copies. Only rare callbacks (progress every
PROGRESS_EVERY steps, mask updates) may synchronise.
"""
from __future__ import annotations

import copy
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pai_core import distributed
from pai_core.augment import augment_batch, check_kinds, generator_at
from pai_core.data import DataBundle, Split
from pai_core.data.stream import batch_size_at, eval_batches, train_batches
from pai_core.determinism import dropout_rng, fast_kernels
from pai_core.masks import Mask, MaskEnforcer
from pai_core.progress import Progress
from pai_core.specs import TrainSpec
from pai_core.store import load_checkpoint, save_checkpoint

log = logging.getLogger("pai_core.training")

PROGRESS_EVERY = 50  # iterations between progress-bar updates


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
    if spec.optimizer in ("adam", "adamw"):
        adam = torch.optim.AdamW if spec.optimizer == "adamw" else torch.optim.Adam
        return adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                           nesterov=spec.nesterov, weight_decay=spec.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1000) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy; restores the model's train/eval mode.

    In a launch of several processes (pai_core.distributed) it is a collective, which every rank
    calls: rank r evaluates only its contiguous run of the batches one process evaluates (a
    streamed split: its loader decodes only those files), then the loss sum and the correct count
    are summed over the ranks. Every rank returns the same numbers: one process's accuracy
    exactly, and its loss to float64 rounding (the same batches, added in another order)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    shard = (distributed.rank(), distributed.world()) if distributed.world() > 1 else None
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in eval_batches(split, batch_size, device, shard):  # tensors in memory, or streamed files
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
    if shard is not None:
        distributed.all_sum(loss, correct)
    model.train(was_training)
    n = max(len(split), 1)
    return {"loss": loss.item() / n, "acc": correct.item() / n}


class Callback:
    """One hook protocol for everything that rides along a training run. Every hook is optional.

    - `before_masking`: the starting weights before the start mask zeroes them: a fresh run's in
      full (Top-KAST keeps the pruned ones' values); a resumed run's are its checkpoint's. May
      replace `state.mask`: the loop masks with what it holds after this hook.
    - `after_backward`: dense gradients exist, the step has not happened. May replace
      `state.mask` (SET/RigL regrowth, a gradual ramp) and set `state.skip_step`.
    - `on_step_end`: after the masked step (progress displays).
    - `on_epoch_end`: after evaluation, before the checkpoint. May set `state.stop` (an
      early-bird ticket was drawn): training then ends at this epoch.
    - `state_dict` / `load_state_dict`: what the callback must carry across a resume; it is
      saved in the checkpoint, so a resumed run decides exactly as an uninterrupted one.
    - `record`: what the stage stores in its info (`mask_updates`, `stopped_early`).
    """

    def before_masking(self, state: TrainState) -> None: ...
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
    augment: Sequence[str] = (),
    crop_fill: float | Sequence[float] = 0.0,
) -> TrainOutcome:
    """Train from `start_iter` to `stop_iter` (default: the spec's length), masked.

    `data` must already be on the model's device, or be an image folder's streamed splits
    (pai_core.data.stream: loader workers decode, the batches arrive on the device). With
    `checkpoint`, the state is saved atomically at every epoch boundary and a run that finds
    one resumes from it.
    `augment` (kinds of pai_core.augment) is applied to each training batch, padding crops
    with `crop_fill`; evaluation never augments. The spec's speed options: `precision: bf16`
    autocasts forward and loss (evaluation stays fp32), `channels_last` converts conv weights
    and batches (restored to the standard layout at the end), `compile` runs the forward
    through torch.compile (the model's own state_dict keys are unchanged), and
    `deterministic: false` uses fast nondeterministic CUDA kernels for this training, which
    breaks bit-exact resume and rewinding on CUDA (no effect on CPU). In a torchrun launch of
    several processes, each trains its slice of every global batch in DDP and rank 0 alone
    writes the checkpoint (pai_core.distributed); the result is one process's, to float tolerance.
    """
    augment = check_kinds(augment)
    device = next(model.parameters()).device
    ipe = math.ceil(len(data.train) / batch_size)
    total = spec.total_iterations(ipe)
    stop = total if stop_iter is None else stop_iter
    if spec.channels_last:  # before the optimizer: its state is created in the same layout
        model.to(memory_format=torch.channels_last)
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
    for cb in callbacks:  # may replace the start mask (Top-KAST: the top-k of the weights it sees)
        cb.before_masking(state)
    enforcer = MaskEnforcer(model, state.mask)
    enforcer.after_step()  # the starting point itself is masked: w' = m ⊙ w
    for cb in callbacks:
        cb.on_start(state)

    model.train()
    # under torchrun: DDP, each process a slice of the same global batch (pai_core.distributed)
    ddp = distributed.DataParallel(model, it) if distributed.world() > 1 else None
    net = model if ddp is None else ddp.net
    forward = torch.compile(net) if spec.compile else net  # same parameters, same state_dict
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if spec.precision == "bf16" else nullcontext
    with fast_kernels() if device.type == "cuda" and not spec.deterministic else nullcontext(), \
            dropout_rng(model, device, order_seed) as seed_step:
        running, seen = torch.zeros((), device=device), 0
        # iteration i's batch: rows of epoch_order(n, order_seed, epoch), in memory or streamed;
        # under DDP a streamed batch is decoded by slice, each rank its own (`sliced`: (rank, world))
        sliced = None if ddp is None else ddp.loader_slice(data, augment)
        batches = train_batches(data, it, stop, batch_size, order_seed, device, shard=sliced)
        while it < stop:
            lr = lr_at(it, spec, ipe, total)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = next(batches)
            if seed_step is not None:
                seed_step(it)
            if augment:
                x = augment_batch(x, augment, generator_at(order_seed, it), fill=crop_fill)
            if ddp is not None:  # this process's slice: cut after augmenting the whole batch, or decoded alone
                x, y = ddp.shard(x, y, None if sliced is None else batch_size_at(len(data.train), batch_size, it))
            if spec.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                out = forward(x)
                loss = (F.cross_entropy(out, y, label_smoothing=spec.label_smoothing) if ddp is None
                        else ddp.loss(out, y, spec.label_smoothing))
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
            running += loss.detach().float()
            seen += 1
            it += 1
            state.it = it
            for cb in callbacks:
                cb.on_step_end(state)
            if it % ipe == 0 or it == stop:
                row = {"iteration": it, "epoch": it / ipe, "lr": lr,
                       "train_loss": ((running if ddp is None else ddp.mean(running)) / seen).item()}
                for split_name in ("val", "test"):  # under DDP each rank its batches, then summed
                    for k, v in evaluate(model, getattr(data, split_name), eval_batch_size).items():
                        row[f"{split_name}_{k}"] = v
                history.append(row)
                running, seen = torch.zeros_like(running), 0
                for cb in callbacks:
                    cb.on_epoch_end(state, row)
                if state.stop:
                    break
                if checkpoint is not None and it < stop and (ddp is None or ddp.main):
                    save_checkpoint(checkpoint, {
                        "model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": it,
                        "history": history, "mask": state.mask, "callbacks": [cb.state_dict() for cb in callbacks]})
    if ddp is not None:
        ddp.close()
    if spec.channels_last:
        model.to(memory_format=torch.contiguous_format)
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
