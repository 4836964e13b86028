"""Evaluation under DDP: rank r evaluates only its contiguous run of the batches one process
evaluates (a streamed split: its loader decodes only those files), and the loss sum and correct
count are all-reduced, so every rank returns one process's numbers: accuracy exactly, loss to
float64 rounding. Whole batches, not a cut of the examples, so every batch (and its float32 loss
sum) is bit for bit one process's.

A gloo launch of 2 CPU processes (as tests/test_distributed.py starts them) evaluates a net with
BatchNorm (eval mode: running statistics, so nothing is synchronised) on 33 in-memory examples
and on a generated image folder, recording which rows each rank's forward saw and which files
each rank decoded.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from pai_core import distributed
from pai_core.data import Split
from pai_core.data import image_folder as imf
from pai_core.data import image_transforms as imt
from pai_core.data import stream
from pai_core.data.stream import eval_batches
from pai_core.training import evaluate
from test_image_folder import make_folder

N = 33  # odd: no batch size below splits it evenly over 2 ranks
BATCHES = (5, 1, 1000)  # 7 batches (3 + 4 per rank), 33 (16 + 17), one (0 + 1: rank 0 evaluates nothing)
# rows [lo, hi) of each rank, by hand: whole batches of 5 are 0-15 | 15-33, of 1: 0-16 | 16-33
ROWS = {5: [(0, 15), (15, 33)], 1: [(0, 16), (16, 33)], 1000: [(0, 0), (0, 33)]}
FOLDER_BATCH = 5  # test split: 12 files, batches 5, 5, 2; val split: 6 files, batches 5, 1


def tiny_net(seed: int = 0) -> nn.Module:
    """Conv + BatchNorm (non-trivial running statistics) + linear head, 3 classes, in eval mode
    per example whatever the input size (adaptive pooling)."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        bn = net[1]
        bn.running_mean.copy_(torch.randn(4, generator=g))
        bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    return net.train()  # evaluate() must put it in eval mode and back


def memory_split() -> Split:
    g = torch.Generator().manual_seed(1)
    return Split(torch.randn(N, 3, 8, 8, generator=g), torch.randint(0, 3, (N,), generator=g))


def folder_data(root: Path):
    return imf.bundle(imf.scan(root), image_size=32, val_size=6, split_seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data") / "eval-folder", {"train": 9, "val": 4})


# ----------------------------------------------------------- slices, without a process group
def test_eval_slices_are_whole_batches_by_hand():
    assert [distributed.eval_slice(N, b, r, 2) for b in BATCHES for r in range(2)] == \
        [rows for b in BATCHES for rows in ROWS[b]]
    # 10 rows in batches of 3 (3, 3, 3, 1) on 3 ranks: 1, 1 and 2 batches
    assert [distributed.eval_slice(10, 3, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [distributed.eval_slice(0, 5, r, 2) for r in range(2)] == [(0, 0), (0, 0)]


def test_a_bad_slice_is_refused():
    with pytest.raises(ValueError, match=r"^rank 2, world 2: need 0 <= rank < world$"):
        distributed.eval_slice(10, 5, 2, 2)
    with pytest.raises(ValueError, match=r"^batch_size: must be at least 1 \(got 0\)$"):
        distributed.eval_slice(10, 0, 0, 2)


@pytest.mark.parametrize("batch", BATCHES)
def test_in_memory_rank_batches_in_rank_order_are_the_whole_batches(batch):
    split = memory_split()
    whole = list(eval_batches(split, batch))
    ranks = [list(eval_batches(split, batch, shard=(r, 2))) for r in range(2)]
    assert len(ranks[0]) + len(ranks[1]) == len(whole) == -(-N // batch)
    for (x, y), (xs, ys) in zip(whole, ranks[0] + ranks[1]):
        assert torch.equal(x, xs) and torch.equal(y, ys)
    for r in range(2):
        lo, hi = ROWS[batch][r]
        assert sum(len(y) for _, y in ranks[r]) == hi - lo


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_rank_batches_are_the_whole_batches_at_the_clipped_size(folder, monkeypatch, workers):
    """A streamed evaluation's batch is at most EVAL_BATCH_MAX (here 4): the slices are whole
    batches of that size (12 test files: 4 | 4 + 4), and hold the whole batches bit for bit."""
    monkeypatch.setattr(stream, "EVAL_BATCH_MAX", 4)
    test = imf.bundle(imf.scan(folder), image_size=32, val_size=6, split_seed=0, workers=workers).test
    whole = list(eval_batches(test, 1000))
    ranks = [list(eval_batches(test, 1000, shard=(r, 2))) for r in range(2)]
    assert [[len(y) for _, y in r] for r in ranks] == [[4], [4, 4]] and [len(y) for _, y in whole] == [4, 4, 4]
    for (x, y), (xs, ys) in zip(whole, ranks[0] + ranks[1]):
        assert torch.equal(x, xs) and torch.equal(y, ys)


def test_one_process_evaluates_as_before_without_collectives(monkeypatch):
    """No launch: every batch in this process, nothing all-reduced, the float64 sum of each
    batch's float32 loss sum, by hand."""
    monkeypatch.setattr(distributed, "all_sum", lambda *t: pytest.fail("all_sum called in one process"))
    split, net = memory_split(), tiny_net()
    got = evaluate(net, split, 5)
    assert net.training, "the train/eval mode is restored"
    net.eval()
    with torch.no_grad():
        outs = [net(split.x[i:i + 5]) for i in range(0, N, 5)]
        loss = sum(F.cross_entropy(o, split.y[i * 5:i * 5 + 5], reduction="sum").double().item()
                   for i, o in enumerate(outs))
        correct = int((torch.cat(outs).argmax(1) == split.y).sum())
    assert got == {"loss": loss / N, "acc": correct / N} and 0 < correct < N


# ------------------------------------------------------------------- 2 gloo processes
def _recording(net: nn.Module) -> list[torch.Tensor]:
    """Every input the net's forward receives, in order."""
    seen: list[torch.Tensor] = []
    net.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


def _count_eval_decodes(data) -> dict[str, list[int]]:
    """Patch FolderDataset so that every evaluation decode (file index) of val and test is
    recorded (in this process: the loaders run with 0 workers)."""
    decoded: dict[str, list[int]] = {"val": [], "test": []}
    names = {id(data.val.dataset): "val", id(data.test.dataset): "test"}
    real = imt.FolderDataset.__getitem__

    def counting(self, item):
        if not self.train:
            decoded[names[id(self)]].append(int(item))
        return real(self, item)

    imt.FolderDataset.__getitem__ = counting
    return decoded


def _rank(rank: int, world: int, root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init("cpu", init_method=f"file://{out}/rendezvous")
    try:
        split, net = memory_split(), tiny_net()
        seen = _recording(net)
        memory = {}
        for b in BATCHES:
            seen.clear()
            metrics = evaluate(net, split, b)
            memory[b] = {"metrics": metrics, "rows": torch.cat(seen) if seen else torch.empty(0, 3, 8, 8),
                         "sizes": [len(x) for x in seen]}
        data = folder_data(Path(root))
        decoded = _count_eval_decodes(data)
        folder = {s: evaluate(tiny_net(1), getattr(data, s), FOLDER_BATCH) for s in ("val", "test")}
        torch.save({"memory": memory, "folder": folder, "decoded": decoded}, Path(out) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def launched(folder, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("launch")
    mp.spawn(_rank, args=(2, str(folder), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _one_thread(fn):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _same(got: dict, want: dict) -> None:
    assert got["acc"] == want["acc"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-12, abs=0)


@pytest.mark.parametrize("batch", BATCHES)
def test_two_ranks_evaluate_their_batches_of_memory_data_and_get_one_process_numbers(launched, batch):
    split = memory_split()
    want = _one_thread(lambda: evaluate(tiny_net(), split, batch))
    ranks = [launched[r]["memory"][batch] for r in range(2)]
    assert ranks[0]["metrics"] == ranks[1]["metrics"], "every rank returns the same numbers"
    _same(ranks[0]["metrics"], want)
    assert 0 < want["acc"] < 1
    for r in range(2):  # what each rank's forward saw: exactly its rows, in whole batches
        lo, hi = ROWS[batch][r]
        assert torch.equal(ranks[r]["rows"], split.x[lo:hi]), f"rank {r}"
    if batch == 5:
        assert [ranks[r]["sizes"] for r in range(2)] == [[5, 5, 5], [5, 5, 5, 3]]


def test_two_ranks_decode_only_their_files_and_get_one_process_numbers(launched, folder, monkeypatch):
    data = folder_data(folder)
    monkeypatch.setattr(imt.FolderDataset, "__getitem__", imt.FolderDataset.__getitem__)  # restored after
    decoded = _count_eval_decodes(data)
    want = _one_thread(lambda: {s: evaluate(tiny_net(1), getattr(data, s), FOLDER_BATCH) for s in ("val", "test")})
    assert decoded == {"val": list(range(6)), "test": list(range(12))}, "one process decodes every file"
    for s in ("val", "test"):
        assert launched[0]["folder"][s] == launched[1]["folder"][s]
        _same(launched[0]["folder"][s], want[s])
    # by hand: test (12 files) in batches 5, 5, 2 -> rank 0 files 0-4, rank 1 files 5-11;
    # val (6 files) in batches 5, 1 -> rank 0 files 0-4, rank 1 file 5. Each file once in all.
    assert launched[0]["decoded"] == {"val": [0, 1, 2, 3, 4], "test": [0, 1, 2, 3, 4]}
    assert launched[1]["decoded"] == {"val": [5], "test": list(range(5, 12))}
