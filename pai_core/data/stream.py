"""Where training and evaluation batches come from: tensors in memory (`Split`), or files
read by DataLoader workers (`image_folder.FolderSplit`). Training asks for the batches of
iterations [start, stop); both sources give the same answer for the same arguments.

In memory, batch i is rows `epoch_order(n, order_seed, epoch)[pos * b:(pos + 1) * b]`
(epoch, pos = divmod(i, iterations per epoch)), indexed on the device: exactly what the
training loop has always done. Streamed, an `IterationSampler` yields the same positions
from the resumed iteration on, each with a seed derived from (order_seed, epoch, position)
that alone decides the example's crop and flip. So iteration i's batch is a pure function
of (order_seed, i), whatever the number of workers, and a resumed run replays it exactly.

Under DDP (pai_core.distributed), a streamed batch is decoded by slices: rank r's sampler
yields only its contiguous slice `slice_bounds(len(batch), r, world)` of each batch's (index, seed)
pairs, so its workers decode 1/world of the batch, the very examples the whole batch holds
there (a seed depends on the position in the epoch, never on who decodes it). In memory the
whole batch is indexed and cut later (DataParallel.shard): slicing a tensor is free, and
on-device augmentation is drawn for the whole batch. Evaluation is split by whole batches
instead (`eval_batches(..., shard=)`): rank r reads its contiguous run of the split's batches.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import default_collate

from pai_core.data.image_folder import FolderSplit
from pai_core.data.image_transforms import normalize
from pai_core.distributed import eval_slice, slice_bounds

WORKERS_ENV = "PAI_DATA_WORKERS"
PREFETCH = 4  # batches per worker in flight
EVAL_BATCH_MAX = 256  # streamed evaluation: 1000 decoded 224² images would be 600 MB per batch

Batch = tuple[torch.Tensor, torch.Tensor]


def default_workers() -> int:
    """Loader processes for streamed data: PAI_DATA_WORKERS, else one per core but one (at
    most 8). A machine setting, not a spec field: it never changes a batch, so no key has it."""
    value = os.environ.get(WORKERS_ENV)
    if value is not None:
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{WORKERS_ENV}: must be an integer >= 0 (got {value!r})") from None
        if n < 0:
            raise ValueError(f"{WORKERS_ENV}: must be an integer >= 0 (got {value!r})")
        return n
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _epoch_order(n: int, order_seed: int, epoch: int) -> torch.Tensor:
    from pai_core.training import epoch_order  # training imports this module

    return epoch_order(n, order_seed, epoch)


def example_seed(order_seed: int, epoch: int, position: int) -> int:
    """The seed of the transform of the example at `position` of epoch `epoch`'s order.
    Hashed, so it shares no stream with the epoch orders or pai_core.augment's draws."""
    digest = hashlib.blake2b(f"image_folder:{order_seed}:{epoch}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def batch_size_at(n: int, batch_size: int, it: int) -> int:
    """The size of iteration `it`'s global batch: `batch_size`, or the remainder at the end of
    an epoch (in memory and streamed alike)."""
    pos = it % math.ceil(n / batch_size)
    return min((pos + 1) * batch_size, n) - pos * batch_size


class IterationSampler(torch.utils.data.Sampler):
    """Batches of (example index, transform seed) for iterations [start, stop) (stop None:
    without end). Epoch e's order is `epoch_order(n, order_seed, e)`; the last batch of an
    epoch is the remainder, as in memory. With `world` > 1, only rank `rank`'s contiguous
    slice of each batch (possibly empty when the batch is smaller than the world)."""

    def __init__(self, n: int, batch_size: int, order_seed: int, start: int = 0, stop: int | None = None,
                 rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank}, world {world}: need 0 <= rank < world")
        self.n, self.batch_size, self.order_seed, self.start, self.stop = n, batch_size, order_seed, start, stop
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("an endless sampler has no length")
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        ipe = math.ceil(self.n / self.batch_size)
        it, order, order_epoch = self.start, None, -1
        while self.stop is None or it < self.stop:
            epoch, pos = divmod(it, ipe)
            if epoch != order_epoch:
                order, order_epoch = _epoch_order(self.n, self.order_seed, epoch).tolist(), epoch
            lo, hi = pos * self.batch_size, min((pos + 1) * self.batch_size, self.n)
            a, b = slice_bounds(hi - lo, self.rank, self.world)  # the whole batch when world is 1
            yield [(order[j], example_seed(self.order_seed, epoch, j)) for j in range(lo + a, lo + b)]
            it += 1


def _collate(items: list[tuple[torch.Tensor, int]], size: int) -> Batch:
    """default_collate; an empty slice (a rank's share of a batch smaller than the world) as
    empty tensors of a batch's dtypes and image shape."""
    if not items:
        return torch.empty((0, 3, size, size), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return default_collate(items)


def _loader(split: FolderSplit, batch_sampler: Any, persistent: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader with its own generator: each iteration draws its workers' base seed, and
    from the global RNG that draw would shift what the model's own randomness sees (no
    transform here reads worker RNGs: their seeds come with the items)."""
    w = split.workers
    return torch.utils.data.DataLoader(
        split.dataset, batch_sampler=batch_sampler, num_workers=w, pin_memory=split.pin_memory,
        collate_fn=functools.partial(_collate, size=split.dataset.size),
        persistent_workers=persistent and w > 0, prefetch_factor=PREFETCH if w else None,
        generator=torch.Generator().manual_seed(0))


def _arrive(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Batch:
    """A uint8 batch from the workers onto the device (non-blocking from pinned memory), then
    ToTensor + Normalize there."""
    return normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)


def train_batches(data: Any, start: int, stop: int | None, batch_size: int, order_seed: int,
                  device: torch.device | None = None, shard: tuple[int, int] | None = None) -> Iterator[Batch]:
    """(x, y) of iterations start, start + 1, ..., stop - 1 (stop None: without end) of
    `data.train`. In memory, on the tensors' own device; streamed, on `device` (default CPU).

    `shard` (rank, world), streamed data only: each yielded batch is already that rank's slice
    of the global batch (of `batch_size_at(len(data.train), batch_size, it)` examples), and
    only that slice was decoded; hand it to `DataParallel.shard` with that global size, which
    then does not cut it again. In memory the whole batch is made and cut after on-device
    augmentation, which draws for the whole batch: `shard` is refused there."""
    split = data.train
    if isinstance(split, FolderSplit):
        rank, world = (0, 1) if shard is None else shard
        sampler = IterationSampler(len(split), batch_size, order_seed, start, stop, rank, world)
        return _streamed(split, sampler, torch.device("cpu") if device is None else torch.device(device))
    if shard is not None:  # refused here, when asked, not at the first batch
        raise ValueError("shard: only streamed (image_folder) batches are decoded by slice; in-memory batches are "
                         "cut after augmentation (DataParallel.shard)")
    return _in_memory(split, start, stop, batch_size, order_seed)


def _streamed(split: FolderSplit, sampler: IterationSampler, device: torch.device) -> Iterator[Batch]:
    for x, y in _loader(split, sampler):
        yield _arrive(x, y, device)


def _in_memory(split: Any, start: int, stop: int | None, batch_size: int, order_seed: int) -> Iterator[Batch]:
    ipe = math.ceil(len(split) / batch_size)
    it, order = start, None
    while stop is None or it < stop:
        epoch, pos = divmod(it, ipe)
        if order is None or pos == 0:
            order = _epoch_order(len(split), order_seed, epoch).to(split.x.device)
        idx = order[pos * batch_size:(pos + 1) * batch_size]
        yield split.x[idx], split.y[idx]
        it += 1


_EVAL_LOADERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def eval_batches(split: Any, batch_size: int, device: torch.device | None = None,
                 shard: tuple[int, int] | None = None) -> Iterator[Batch]:
    """The split in file order, in batches of `batch_size` (streamed: at most EVAL_BATCH_MAX).
    A streamed split keeps its loader, workers included, for the next evaluation.

    `shard` (rank, world): only that rank's contiguous run of these very batches
    (`distributed.eval_slice`); streamed, its loader reads only those files."""
    streamed = isinstance(split, FolderSplit)
    b = min(batch_size, EVAL_BATCH_MAX) if streamed else batch_size
    lo, hi = (0, len(split)) if shard is None else eval_slice(len(split), b, *shard)
    if not streamed:
        for i in range(lo, hi, batch_size):  # hi is a batch boundary or the end: no batch is cut
            yield split.x[i:i + batch_size], split.y[i:i + batch_size]
        return
    if shard is not None and lo == hi:  # a rank with no batch (fewer batches than ranks)
        return
    loaders = _EVAL_LOADERS.setdefault(split, {})
    if (key := b if shard is None else (b, lo, hi)) not in loaders:
        rows = torch.utils.data.SequentialSampler(range(len(split))) if shard is None else range(lo, hi)
        loaders[key] = _loader(split, torch.utils.data.BatchSampler(rows, b, False), persistent=True)
    dev = torch.device("cpu") if device is None else torch.device(device)
    for x, y in loaders[key]:
        yield _arrive(x, y, dev)
