"""One training on many processes (GPUs or machines): DistributedDataParallel under torchrun,
giving what one process gives with the same global batch, to float tolerance.

torchrun starts the same command N times with RANK, WORLD_SIZE and LOCAL_RANK set. Each process
builds the same plan and executes it with the in-process executor, stage after stage in the same
order (`execute_jobs`); nothing here runs unless a launch of more than one process is detected,
so the single-process path is untouched.

- Store (`run_stage`): rank 0 alone decides whether a stage is stored and alone writes it; every
  rank computes it (a training needs all of them; the others are cheap and identical) and then
  returns rank 0's ref. The store must be shared by every node (it holds the inputs of each stage).
- Training (`DataParallel`, used by `pai_core.training.train`): every step takes the global batch
  of `batch_size` indices exactly as one process would (same epoch order, same augmentation draws,
  made for the whole batch and then sliced) and rank r keeps its contiguous slice. Streamed data
  (image_folder) is decoded by slice instead: rank r's loader reads only its slice of each global
  batch (the same examples, the same per-example crops), so N ranks decode each file once, not N
  times (`loader_slice`, pai_core.data.stream.train_batches). The loss is
  each slice's *sum* scaled by world / global batch size, so DDP's mean over ranks is the mean
  over the global batch even when slices are uneven (a batch of 33 on 2 ranks, or the short last
  batch of an epoch). DDP all-reduces the gradients during backward, so callbacks (`after_backward`:
  SET/RigL regrowth, gradual pruning, the slimming L1) see the averaged gradients, the same on
  every rank, and masks move identically everywhere; a callback must therefore not draw from
  rank-local randomness (every one here uses generators seeded by the iteration).
- BatchNorm: on CUDA, BatchNorm layers become SyncBatchNorm for the training (statistics over the
  global batch, as one process computes them; restored afterwards, sharing the same parameters
  and buffers). torch syncs BatchNorm only on GPUs, so a model with BatchNorm is refused on CPU.
- Evaluation (`pai_core.training.evaluate`): rank r evaluates only its contiguous run of the
  batches one process evaluates (`eval_slice`; streamed, its loader decodes only those files),
  then the float64 loss sum and the int64 correct count are all-reduced (`all_sum`): every rank
  gets the same numbers, one process's accuracy exactly and its loss to float64 rounding. Whole
  batches, not `slice_bounds` of the examples, because each batch's loss is summed in float32
  and kernels may round differently for another batch size: cut mid-batch, the loss would be one
  process's only to float32 rounding. Every rank must therefore call it (a collective).
- Checkpoints: rank 0 writes them; at the start every rank reads the same file, and a launch
  whose ranks resume at different iterations (a store not shared) is refused.
"""
from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from pai_core.executor import Hooks, Job, Outcome
    from pai_core.plan import Node
    from pai_core.stages.registry import Runtime
    from pai_core.store import Ref, Store

log = logging.getLogger("pai_core.distributed")

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets in every process it starts


class LaunchAborted(BaseException):
    """A stage failed on this rank. Other ranks may be waiting inside a collective for this one,
    so the launch cannot go on to the next stage: this ends the process (torchrun then stops the
    others). A BaseException so that the executor, which carries on past an ordinary stage
    failure, does not; a re-run resumes from the store and the last checkpoint."""


@dataclass(frozen=True)
class Launch:
    rank: int
    world: int
    local_rank: int


def launch_env(environ: Mapping[str, str] = os.environ) -> Launch | None:
    """The torchrun launch this process belongs to, or None (a plain process, or a world of 1)."""
    if not all(k in environ for k in ENV):
        return None
    try:
        rank, world, local = (int(environ[k]) for k in ENV)
    except ValueError:
        raise ValueError(f"{', '.join(ENV)}: integers expected (got {', '.join(environ[k][:20] for k in ENV)})") \
            from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise ValueError(f"RANK {rank}, WORLD_SIZE {world}, LOCAL_RANK {local}: need 0 <= RANK < WORLD_SIZE")
    return Launch(rank, world, local) if world > 1 else None


def uses_cuda(device: str) -> bool:
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def check_launch(spec: Any, environ: Mapping[str, str] = os.environ) -> Launch | None:
    """Refuse, in one line naming the field, a spec this launch cannot train as one process would:
    before any process group or compute exists."""
    launch = launch_env(environ)
    if launch is None:
        return None
    batch = spec.data.batch_size
    if batch < launch.world:
        raise ValueError(f"data.batch_size: {batch} is smaller than the {launch.world} processes of this launch; "
                         f"each needs at least one example per step (allowed: >= {launch.world})")
    if uses_cuda(spec.device):
        if launch.local_rank >= (n := torch.cuda.device_count()):
            raise ValueError(f"device: {spec.device}, but LOCAL_RANK {launch.local_rank} has no GPU (this node has "
                             f"{n}); start at most {n} processes per node (--nproc_per_node)")
    else:
        from pai_core.models import model_info

        if model_info(spec.model.name).has_batch_norm(spec.model.params):
            raise ValueError(f"device: {spec.device} trains on CPU, where torch cannot synchronise BatchNorm across "
                             f"processes and {spec.model.name} has BatchNorm: each process would normalise by its "
                             "own slice, unlike one process; allowed: cuda, or a launch of one process")
    return launch


def init(device: str = "auto", init_method: str | None = None) -> Launch | None:
    """Join this launch's process group: nccl when training on CUDA (each process on the GPU
    cuda:LOCAL_RANK, so `device: cuda` means that one), gloo on CPU. None outside torchrun.
    `init_method`: where the processes meet; default torchrun's MASTER_ADDR:MASTER_PORT
    (`env://`), or e.g. `file:///shared/rendezvous` (no port to pick)."""
    launch = launch_env()
    if launch is None or dist.is_initialized():
        return launch
    cuda = uses_cuda(device)
    if cuda:
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method or "env://", rank=launch.rank,
                            world_size=launch.world)
    log.info("rank %d of %d joined (%s)", launch.rank, launch.world, dist.get_backend())
    return launch


def shutdown() -> None:
    """Leave the process group once every process is done: a process that tears its
    connections down while another still uses them makes gloo abort that one."""
    if dist.is_available() and dist.is_initialized():
        try:  # gloo can bound the wait, so a process whose peer died does not hang for the group's 30 min
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=120))
            else:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def world() -> int:
    """Processes training together: 1 unless a process group of several is initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes the store, checkpoints and tracking."""
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """`src`'s small picklable object, on every rank (itself in a single process)."""
    if world() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's small picklable object, in rank order, on every rank."""
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def main_decides(fn: Callable[[], Any]) -> Any:
    """Rank 0 runs `fn` and every rank returns its result; if it raised, every rank raises
    (LaunchAborted), so no rank goes on alone."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - sent to every rank, then raised everywhere
            error = e
    ok, result, why = broadcast((error is None, result, None if error is None else f"{type(error).__name__}: {error}"))
    if not ok:
        raise LaunchAborted(f"rank 0: {why}") from error
    return result


# ---------------------------------------------------------------------------------- stages
def run_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> Ref:
    """`pai_core.stages.run` for one process of a launch: rank 0 looks in the store and writes the
    result; every rank computes (together, for a training) and returns rank 0's ref."""
    from pai_core.stages.registry import compute, store_result

    def look() -> Ref | None:
        hit = rt.store.get(node.stage, node.key)
        if hit is None:
            rt.store.check_writable(node.stage)  # a read-only store: refused on every rank, before compute
        return hit

    hit = main_decides(look)
    if hit is not None:
        log.info("%s %s: reused", node.role, node.key)
        return hit
    log.info("%s %s: computing on rank %d of %d", node.role, node.key, rank(), world())
    try:
        payload, info = compute(node, inputs, rt)
    except Exception as e:
        raise LaunchAborted(f"{node.role} {node.key} failed on rank {rank()}: {type(e).__name__}: {e}") from e
    info.computed_by = {**(info.computed_by or {}), "world": world()}
    if not is_main():
        rt.computed.append(f"{node.stage}/{node.key}")
    return main_decides(lambda: store_result(node, inputs, rt, payload, info))


def execute_jobs(jobs: Sequence[Job], store: Store, hooks: Hooks | None = None) -> Outcome:
    """Every job's plan, on every rank of the launch, with the in-process runner: the same stages
    in the same order everywhere. `hooks` (MLflow tracking) run on rank 0 only. Refused when the
    ranks do not see the same stored stages: the store must be shared by every node."""
    from pai_core.executor import InProcess, execute

    stored = sorted({n.key for job in jobs for n in job.plan.nodes if store.get(n.stage, n.key) is not None})
    seen = gather((str(store.root), stored))
    if any(s[1] != seen[0][1] for s in seen):
        bad = next(r for r, s in enumerate(seen) if s[1] != seen[0][1])
        raise ValueError(f"PAI_HOME: rank {bad} sees {len(seen[bad][1])} stored stages under {seen[bad][0]}, rank 0 "
                         f"{len(seen[0][1])} under {seen[0][0]}: every node of a launch "
                         "must share one store")
    return execute(jobs, InProcess(store), store, hooks if is_main() else None)


# -------------------------------------------------------------------------------- training
def slice_bounds(n: int, r: int, w: int) -> tuple[int, int]:
    """Rank r's contiguous slice of n examples: sizes differ by at most one."""
    return n * r // w, n * (r + 1) // w


def eval_slice(n: int, batch_size: int, r: int, w: int) -> tuple[int, int]:
    """Rank r's rows [lo, hi) of an evaluation of n examples in batches of `batch_size`: its
    contiguous run `slice_bounds(batches, r, w)` of whole batches, so that every batch is the one
    a single process evaluates there (lo is a batch boundary; hi one too, or n). Ranks differ by
    at most one batch; with fewer batches than ranks some get none."""
    if not 0 <= r < w:
        raise ValueError(f"rank {r}, world {w}: need 0 <= rank < world")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1 (got {batch_size})")
    a, b = slice_bounds(-(-n // batch_size), r, w)
    return min(a * batch_size, n), min(b * batch_size, n)


def all_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (nothing in a single process). One all-reduce per
    tensor: its dtype is kept (float64 sums, int64 counts), which one packed tensor would not."""
    if world() > 1:
        for t in tensors:
            dist.all_reduce(t)


def _sync_batchnorm(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap every BatchNorm for a SyncBatchNorm sharing its parameters and buffers (so the
    optimizer, the mask enforcer and state_dict see the same tensors); returns what to put back."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                swapped.append((parent, name, child))
    return swapped


class DataParallel:
    """This process's part of one training: the model in DDP, its slice of each global batch."""

    def __init__(self, model: nn.Module, start_iter: int):
        self.rank, self.world = rank(), world()
        self.main = self.rank == 0
        starts = gather(start_iter)  # every rank must resume from the same checkpoint
        if len(set(starts)) != 1:
            raise ValueError(f"ranks start at iterations {starts}: each read a different checkpoint; every node "
                             "of a launch must share one store (PAI_HOME)")
        device = next(model.parameters()).device
        if device.type == "cuda":
            self.swapped = _sync_batchnorm(model)
        else:
            self.swapped = []
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                raise ValueError("device: cpu: torch synchronises BatchNorm across processes only on GPUs; this "
                                 "model has BatchNorm, so its training would not be one process's; allowed: cuda")
        self.net: nn.Module | None = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        self.scale = 1.0

    def loader_slice(self, data: Any, augment: Sequence[str] = ()) -> tuple[int, int] | None:
        """(rank, world) when this rank's loader should decode only its slice of each global batch:
        streamed training data, which decoding dominates. None (the whole batch is made, then cut
        by `shard`) for tensors in memory, where slicing is free, and whenever on-device
        augmentation is asked for, since its draws are made for the whole batch."""
        from pai_core.data.image_folder import FolderSplit

        return (self.rank, self.world) if isinstance(data.train, FolderSplit) and not augment else None

    def shard(self, x: torch.Tensor, y: torch.Tensor, total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of a global batch, and the loss scale for it. `total` None: x, y are
        the whole batch (already augmented as a whole) and are cut here. `total` given: x, y are
        already this rank's slice of a global batch of `total` examples (decoded alone, see
        `loader_slice`), kept as they are; a batch whose size is not that slice's is refused, so
        nothing is cut twice or trained whole."""
        if total is None:
            total = len(y)
            lo, hi = slice_bounds(total, self.rank, self.world)
            x, y = x[lo:hi], y[lo:hi]
        else:
            lo, hi = slice_bounds(total, self.rank, self.world)
            if len(y) != hi - lo:
                raise ValueError(f"rank {self.rank} of {self.world}: a pre-sliced batch of {len(y)} examples, but its "
                                 f"slice of a global batch of {total} holds {hi - lo}")
        self.scale = self.world / max(total, 1)  # the GLOBAL batch's size: an empty slice adds 0
        return x, y

    def loss(self, out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """The slice's summed loss × world / global batch: DDP's average over ranks is then the
        global batch's mean, whatever the slice sizes (an empty slice contributes zero)."""
        return F.cross_entropy(out, y, reduction="sum", label_smoothing=label_smoothing) * self.scale

    def mean(self, running: torch.Tensor) -> torch.Tensor:
        """The global batch's mean loss from each rank's scaled sums (one all-reduce per epoch)."""
        total = running.detach().clone()
        dist.all_reduce(total)
        return total / self.world

    def close(self) -> None:
        """The plain model again: BatchNorm modules back, DDP's gradient hooks released."""
        for parent, name, child in self.swapped:
            setattr(parent, name, child)
        self.swapped, self.net = [], None
        gc.collect()
