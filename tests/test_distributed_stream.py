"""DDP on streamed data (image_folder): each rank's loader decodes only its slice of every global
batch, the same examples with the same crops, so 2 ranks decode each file once, not twice, and
still train as one process with the same global batch (to float tolerance).

The samplers are checked against the whole-batch sampler (worlds 2 and 3, an epoch's short last
batch, a mid-epoch start); a gloo launch of 2 processes on a generated folder of small JPEGs
counts every training decode per rank. In-memory data keeps its path (whole batch, cut later).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pai_core import distributed
from pai_core.data import image_folder as imf
from pai_core.data import image_transforms as imt
from pai_core.data import load
from pai_core.data.stream import IterationSampler, batch_size_at, example_seed, train_batches
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.spec_io import parse_spec
from pai_core.specs import TrainSpec
from pai_core.training import epoch_order, train
from test_image_folder import digest, make_folder, raw_spec

N, BATCH, SEED = 21, 4, 7  # 27 train files - 6 held out: batches 4, 4, 4, 4, 4 and 1 per epoch
IPE = 6
SGD = TrainSpec(optimizer="sgd", lr=0.02, momentum=0.9, epochs=2)
RESUME_AT = 8  # mid epoch 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "ddp-folder", {"train": 9, "val": 4})


def bundle(root: Path, workers: int = 0):
    return imf.bundle(imf.scan(root), image_size=32, val_size=6, split_seed=0, workers=workers)


# ---------------------------------------------------------------- samplers and batches
def test_global_batch_sizes_by_hand():
    assert [batch_size_at(N, BATCH, it) for it in range(8)] == [4, 4, 4, 4, 4, 1, 4, 4]
    assert [batch_size_at(20, 4, it) for it in range(6)] == [4] * 6  # no remainder


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("start, stop", [(0, 2 * IPE), (4, 14)])  # from the start; from mid epoch 0
def test_rank_slices_in_rank_order_are_the_whole_batch(world, start, stop):
    whole = list(IterationSampler(N, BATCH, SEED, start, stop))
    ranks = [list(IterationSampler(N, BATCH, SEED, start, stop, r, world)) for r in range(world)]
    assert all(len(r) == len(whole) == stop - start for r in ranks)
    for i, batch in enumerate(whole):
        assert sum((ranks[r][i] for r in range(world)), []) == batch, f"iteration {start + i}"
    # slice sizes by hand: a batch of 4 is 2 + 2 or 1 + 1 + 2, the last batch of 1 is 0 + 1 or 0 + 0 + 1
    sizes = {4: {2: [2, 2], 3: [1, 1, 2]}, 1: {2: [0, 1], 3: [0, 0, 1]}}
    for i in range(len(whole)):
        assert [len(ranks[r][i]) for r in range(world)] == sizes[len(whole[i])][world]
    # what a slice holds: rows of the epoch's order, seeded by their position in the epoch
    epoch, pos = divmod(start, IPE)
    lo = pos * BATCH + distributed.slice_bounds(4, world - 1, world)[0]
    order = epoch_order(N, SEED, epoch).tolist()
    assert ranks[-1][0] == [(order[j], example_seed(SEED, epoch, j)) for j in range(lo, pos * BATCH + 4)]


def test_a_bad_rank_is_refused():
    with pytest.raises(ValueError, match=r"^rank 2, world 2: need 0 <= rank < world$"):
        IterationSampler(N, BATCH, SEED, rank=2, world=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_ranks_decoded_slice_is_the_whole_batchs_slice_bit_for_bit(folder, workers):
    """Iterations 3-6 (epoch 0's last batch of 1, so rank 0's slice there is empty) on 2 ranks."""
    data = bundle(folder, workers)
    whole = list(train_batches(data, 3, 7, BATCH, SEED))
    for r in range(2):
        mine = list(train_batches(data, 3, 7, BATCH, SEED, shard=(r, 2)))
        for i, ((x, y), (xs, ys)) in enumerate(zip(whole, mine)):
            lo, hi = distributed.slice_bounds(len(y), r, 2)
            assert xs.shape == (hi - lo, 3, 32, 32) and xs.dtype == torch.float32 and ys.dtype == torch.int64
            assert torch.equal(xs, x[lo:hi]) and torch.equal(ys, y[lo:hi]), f"rank {r}, iteration {3 + i}"
    assert [len(y) for _, y in whole] == [4, 4, 1, 4]


class DataParallelStub(distributed.DataParallel):
    """DataParallel's slicing without a process group or a model."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.scale = rank, world, 1.0


def test_in_memory_data_keeps_the_whole_batch():
    """Tensors are cut after augmentation (drawn for the whole batch): a shard is refused when
    asked, and a training never asks for one there, nor for streamed data augmented on the device."""
    with pytest.raises(ValueError, match=r"^shard: only streamed"):
        train_batches(load("synthetic"), 0, 1, 10, 0, shard=(0, 2))
    ddp = DataParallelStub(0, 2)
    assert ddp.loader_slice(load("synthetic"), ()) is None
    streamed = type("Bundle", (), {"train": imf.FolderSplit(None)})()
    assert ddp.loader_slice(streamed, ()) == (0, 2)
    assert ddp.loader_slice(streamed, ("flip",)) is None


def test_shard_cuts_a_whole_batch_keeps_a_sliced_one_and_refuses_a_mismatch():
    x, y = torch.arange(8.0).view(4, 2), torch.arange(4)
    one = DataParallelStub(1, 2)
    xs, ys = one.shard(x, y)  # whole: cut to rows 2-3
    assert torch.equal(ys, y[2:]) and one.scale == 2 / 4
    xs, ys = one.shard(x[2:], y[2:], total=4)  # already sliced: kept as it is, scaled by the GLOBAL size
    assert xs.data_ptr() == x[2:].data_ptr() and torch.equal(ys, y[2:]) and one.scale == 2 / 4
    with pytest.raises(ValueError, match=r"^rank 1 of 2: a pre-sliced batch of 4 examples, but its slice of a "
                                         r"global batch of 4 holds 2$"):
        one.shard(x, y, total=4)  # a whole batch passed as a slice would train twice the examples
    zero = DataParallelStub(0, 2)
    xs, ys = zero.shard(x[:0], y[:0], total=1)  # an epoch's last batch of 1: rank 0's slice is empty
    assert len(ys) == 0 and zero.scale == 2.0


# ---------------------------------------------------------------- 2 gloo processes
def _count_decodes() -> list[tuple[int, int]]:
    """Patch FolderDataset so that every training decode, (file, seed), is recorded (in this
    process: the loaders run with 0 workers); evaluation decodes are not training's."""
    decoded: list[tuple[int, int]] = []
    real = imt.FolderDataset.__getitem__

    def counting(self, item):
        if self.train:
            decoded.append(tuple(item))
        return real(self, item)

    imt.FolderDataset.__getitem__ = counting
    return decoded


def _fit(root: Path) -> tuple[dict, list]:
    """LeNet-5 on the folder for 2 epochs, stopped mid epoch 2 and resumed from there."""
    data = bundle(root)
    model = build_model("lenet5", (3, 32, 32), 3, seed=0)
    first = train(model, data, SGD, batch_size=BATCH, order_seed=SEED, stop_iter=RESUME_AT)
    out = train(model, data, SGD, batch_size=BATCH, order_seed=SEED, start_iter=RESUME_AT,
                optimizer_state=first.optimizer_state)
    return model.state_dict(), first.history + out.history


def _rank(rank: int, world: int, root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init("cpu", init_method=f"file://{out}/rendezvous")
    try:
        decoded = _count_decodes()
        weights, history = _fit(Path(root))
        sliced = list(decoded)
        decoded.clear()
        # the former path, for comparison: every rank decodes the whole batch, then cuts it
        real = distributed.DataParallel.loader_slice
        distributed.DataParallel.loader_slice = lambda self, data, augment=(): None
        whole_weights, _ = _fit(Path(root))
        distributed.DataParallel.loader_slice = real
        torch.save({"weights": weights, "history": history, "decoded": sliced, "whole_weights": whole_weights,
                    "whole_decoded": list(decoded)}, Path(out) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def test_two_ranks_decode_half_each_and_train_as_one_process(folder, tmp_path, monkeypatch):
    mp.spawn(_rank, args=(2, str(folder), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(imt.FolderDataset, "__getitem__", imt.FolderDataset.__getitem__)  # restored after
        decoded = _count_decodes()
        single, history = _fit(folder)
    finally:
        torch.set_num_threads(before)

    for k, v in single.items():  # one process's weights, to float tolerance; ranks bit-identical
        assert torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]), k
        torch.testing.assert_close(ranks[0]["weights"][k], v, rtol=1e-5, atol=1e-6)
        # decoding by slice changed no number: the whole-batch path gives the same bits
        assert torch.equal(ranks[0]["weights"][k], ranks[0]["whole_weights"][k]), k
    for a, b in zip(ranks[0]["history"], history):
        assert [a["iteration"], a["train_loss"]] == [b["iteration"], pytest.approx(b["train_loss"], rel=1e-5)]

    # what each rank decoded: exactly its slices, batch after batch, resumed at RESUME_AT
    batches = list(IterationSampler(N, BATCH, SEED, 0, 2 * IPE))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 1] * 2
    assert [tuple(p) for p in decoded] == [p for b in batches for p in b], "one process decodes every batch whole"
    for r in range(2):
        want = [p for b in batches for p in b[slice(*distributed.slice_bounds(len(b), r, 2))]]
        assert [tuple(p) for p in ranks[r]["decoded"]] == want, f"rank {r}"
        assert [tuple(p) for p in ranks[r]["whole_decoded"]] == decoded, "the former path decoded it all"
    # per epoch: rank 0 decodes 2+2+2+2+2+0 = 10, rank 1 2+2+2+2+2+1 = 11, one process 21
    assert [len(ranks[r]["decoded"]) for r in range(2)] == [20, 22] and len(decoded) == 42


# ---------------------------------------------------------------- nothing else moved
def test_plan_keys_of_an_image_folder_spec_are_unchanged(folder):
    """Decoding by slice is how a launch reads, not what is computed: pinned before it existed."""
    assert digest(parse_spec(raw_spec(folder, val_size=6))) == "3a725ccc698a6eb9"
    lth = raw_spec(folder, val_size=6, flow="lottery_ticket") | {
        "prune": {"schedule": "iterative", "rate": 0.2, "rounds": 1}}
    assert digest(parse_spec(lth)) == "3ac13dd3127029e9"
    assert len(build_plan(parse_spec(lth)).nodes) > 0
