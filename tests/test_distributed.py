"""One training on two CPU processes (gloo, DDP) gives what one process gives with the same
global batch, to float tolerance; only rank 0 writes; bad launches are refused before compute.

The processes are started with torch.multiprocessing.spawn, meeting through a file, each with one
thread (the machine may have two cores). The model is lenet_300_100, which has no BatchNorm:
on CPU torch cannot synchronise BatchNorm, so such a model is refused there (tested below),
and equality needs no SyncBatchNorm.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from conftest import ROOT, tiny_raw, tiny_spec
from pai_core import distributed
from pai_core.data import load
from pai_core.executor import Job, run_specs
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.specs import TrainSpec
from pai_core.store import Store
from pai_core.training import Callback, train

SGD = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=2)
BATCH = 333      # 1000 training examples: batches of 333, 333, 333 and 1 per epoch (4 iterations)
AUGMENT = ("crop", "flip")
CRASH_AT = 6     # mid epoch 2, after epoch 1's checkpoint (iteration 4)
PLAN = dict(train={"epochs": 1}, prune={"rounds": 1})  # a tiny LTH spec: pretrain, one round


def _worker(rank: int, world: int, out: str) -> None:
    """One process of a launch, as torchrun would start it (its environment), running every job.
    They meet through a file, not a port (a free port can be taken before rank 0 binds it)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init("cpu", init_method=f"file://{out}/rendezvous")
    try:
        for job in JOBS:
            job(rank, Path(out))
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """One launch of 2 processes for the module (starting processes costs seconds): its outputs."""
    out = tmp_path_factory.mktemp("launch")
    mp.spawn(_worker, args=(2, str(out)), nprocs=2, join=True)
    return out


# --------------------------------------------------------------------- train() on 2 ranks
def masked_start():
    """LeNet-300-100 (seed 0) and a fixed random mask keeping half of each weight matrix."""
    data = load("synthetic")
    model = build_model("lenet_300_100", data.in_shape, data.num_classes, seed=0)
    g = torch.Generator().manual_seed(1)
    mask = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters() if n.endswith("weight")}
    return data, model, mask


class Crash(Callback):
    def after_backward(self, state):
        if state.it == CRASH_AT:
            raise KeyboardInterrupt("simulated kill")


def _train_with_resume(rank: int, out: Path) -> None:
    """Train until the simulated kill (rank 0 checkpoints at iteration 4), then a fresh model
    resumes from that checkpoint and finishes; record the weights and who saved checkpoints."""
    import pai_core.training as training

    saves: list[int] = []
    real_save = training.save_checkpoint
    training.save_checkpoint = lambda path, state: (saves.append(state["iteration"]), real_save(path, state))
    ckpt = out / "train.ckpt.pt"
    data, model, mask = masked_start()
    kw = dict(batch_size=BATCH, order_seed=3, mask=mask, checkpoint=ckpt, augment=AUGMENT)
    try:
        train(model, data, SGD, callbacks=[Crash()], **kw)
    except KeyboardInterrupt:
        pass
    _, fresh, _ = masked_start()
    result = train(fresh, data, SGD, **kw)
    torch.save({"model": fresh.state_dict(), "history": result.history, "saves": saves}, out / f"rank{rank}.pt")


def test_two_processes_train_as_one_with_the_same_global_batch(launched):
    """Uneven slices (333 = 166 + 167, and a last batch of 1: rank 0's slice is empty), augmentation
    drawn for the whole batch, a mask, and a kill + resume in the middle: the weights equal one
    uninterrupted process's to float tolerance, and are bit-identical across ranks."""
    data, single, mask = masked_start()
    ref = train(single, data, SGD, batch_size=BATCH, order_seed=3, mask=mask, augment=AUGMENT)
    ranks = [torch.load(launched / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for k, v in single.state_dict().items():
        assert torch.equal(ranks[0]["model"][k], ranks[1]["model"][k]), k
        torch.testing.assert_close(ranks[0]["model"][k], v, rtol=1e-5, atol=1e-6)
    for name, m in mask.items():  # the mask held on every rank: pruned weights are exactly zero
        assert not ranks[0]["model"][name][~m].any()
    assert ranks[0]["saves"] == [4] and ranks[1]["saves"] == [], "only rank 0 writes the checkpoint"
    got, want = ranks[0]["history"], ref.history
    assert [r["iteration"] for r in got] == [r["iteration"] for r in want] == [4, 8]
    for a, b in zip(got, want):  # the global batch's mean loss, and val/test evaluated by batches over the ranks
        for k in ("train_loss", "val_loss", "test_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), k


def test_slices_cover_the_batch_once():
    """Contiguous slices, sizes differing by at most one; a batch smaller than the world leaves
    a rank empty (its loss then contributes zero)."""
    assert [distributed.slice_bounds(333, r, 2) for r in range(2)] == [(0, 166), (166, 333)]
    assert [distributed.slice_bounds(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [distributed.slice_bounds(1, r, 2) for r in range(2)] == [(0, 0), (0, 1)]


def test_batchnorm_becomes_syncbatchnorm_sharing_its_tensors_and_comes_back():
    """On CUDA a training swaps BatchNorm for SyncBatchNorm (statistics of the global batch); the
    optimizer, the mask enforcer and state_dict must see the very same tensors, before and after."""
    model = build_model("conv2", (3, 32, 32), 10, seed=0, batch_norm=True)
    params, buffers, keys = dict(model.named_parameters()), dict(model.named_buffers()), list(model.state_dict())
    swapped = distributed._sync_batchnorm(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(swapped) == len(bns) > 0 and all(isinstance(m, torch.nn.SyncBatchNorm) for m in bns)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert list(model.state_dict()) == keys
    for parent, name, child in swapped:  # what DataParallel.close does
        setattr(parent, name, child)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert list(model.state_dict()) == keys


# ------------------------------------------------------------ a whole plan on 2 ranks
def _plan_on_two_ranks(rank: int, out: Path) -> None:
    """A tiny LTH spec executed by every rank; each records the store writes it made and its refs."""
    store = Store(out / "store")
    puts: list[str] = []
    real_put = store.put
    store.put = lambda stage, key, *a, **k: (puts.append(f"{stage}/{key}"), real_put(stage, key, *a, **k))[1]
    result = distributed.execute_jobs([Job(spec := tiny_spec(**PLAN), build_plan(spec))], store)
    (out / f"plan{rank}.json").write_text(json.dumps({
        "puts": puts, "errors": list(result.errors), "refs": {k: r.sha256 for k, r in result.refs.items()},
        "computed": result.computed}))


def test_a_plan_on_two_ranks_is_written_once_by_rank_0(launched, tmp_path):
    got = [json.loads((launched / f"plan{r}.json").read_text()) for r in range(2)]
    plan = build_plan(tiny_spec(**PLAN))
    assert got[0]["errors"] == got[1]["errors"] == []
    assert sorted(got[0]["puts"]) == sorted(f"{n.stage}/{n.key}" for n in plan.nodes) and got[1]["puts"] == []
    assert got[0]["refs"] == got[1]["refs"], "every rank goes on with rank 0's artifacts"
    assert got[0]["computed"] == got[1]["computed"] == len(plan.nodes)

    one = run_specs([tiny_spec(**PLAN)], single := Store(tmp_path / "single"))  # the same spec in one process
    two = Store(launched / "store")
    for rnd in plan.rounds:
        a = single.load(one.refs[rnd.trained.key])["model"]
        b = two.load(two.get(rnd.trained.stage, rnd.trained.key))["model"]
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
        ev1 = one.refs[rnd.evaluate.key].info
        ev2 = two.get("evaluate", rnd.evaluate.key).info
        assert ev2.sparsity == ev1.sparsity and ev2.test_loss == pytest.approx(ev1.test_loss, rel=1e-5)
    info = two.get(plan.rounds[-1].trained.stage, plan.rounds[-1].trained.key).info
    assert info.computed_by["world"] == 2


JOBS = (_train_with_resume, _plan_on_two_ranks)  # what each process of the launch runs, in order


# ------------------------------------------------------------------ refused before compute
def env(world: int = 2, rank: int = 0) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}


def test_launch_is_read_from_torchruns_environment():
    assert distributed.launch_env({}) is None
    assert distributed.launch_env(env(world=1)) is None, "a world of one is a plain process"
    assert distributed.launch_env(env(world=4, rank=3)) == distributed.Launch(3, 4, 3)
    with pytest.raises(ValueError, match="RANK 2, WORLD_SIZE 2"):
        distributed.launch_env(env(world=2, rank=2))


def test_batch_smaller_than_the_world_is_refused():
    spec = tiny_spec(data={"batch_size": 1})
    with pytest.raises(ValueError, match=r"^data\.batch_size: 1 is smaller than the 2 processes"):
        distributed.check_launch(spec, env())
    assert distributed.check_launch(tiny_spec(data={"batch_size": 2}), env()) == distributed.Launch(0, 2, 0)
    assert distributed.check_launch(spec, {}) is None, "one process: any batch size"


def test_batchnorm_on_cpu_is_refused():
    spec = tiny_spec(model={"name": "conv2", "batch_norm": True}, device="cpu")
    with pytest.raises(ValueError, match=r"^device: cpu .*conv2 has BatchNorm"):
        distributed.check_launch(spec, env())
    distributed.check_launch(tiny_spec(model={"name": "conv2"}, device="cpu"), env())  # no BN: fine


def test_cli_refuses_a_bad_launch_in_one_line(tmp_path, monkeypatch, pai_home):
    from flows.cli import app

    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(tiny_raw()))
    for k, v in env().items():
        monkeypatch.setenv(k, v)
    res = CliRunner().invoke(app, ["train-distributed", str(path), "data.batch_size=1"], terminal_width=200)
    assert res.exit_code == 2
    assert "data.batch_size: 1 is smaller than the 2 processes" in res.output
    assert not (pai_home / "store").exists(), "nothing computed or written"


def test_plan_keys_of_an_existing_spec_are_unchanged():
    """The launch is not part of any key (like `device`): pinned before this feature existed."""
    keys = [(n.role, n.key) for n in build_plan(tiny_spec()).nodes]
    assert keys == [
        ("init", "d56f2546ece791625d27"), ("pretrain", "d5bc494466d1555b8a36"), ("evaluate", "9876a7db5faae4bc144c"),
        ("score", "2c708cf21b2aa8228909"), ("mask", "c881bbace7e346f708db"), ("retrain", "a8f29e3654c814e8613a"),
        ("evaluate", "5c872da9984123bdf4c6"), ("score", "a28ef0b10c011223c176"), ("mask", "b400bee3184bc70746c1"),
        ("retrain", "7e3f7854fb4f1113257d"), ("evaluate", "2f925b02da6ea27390fd")]


# ---------------------------------------------------------------------- torchrun, end to end
def _torchrun(spec: Path, home: Path) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in (*distributed.ENV, "MASTER_ADDR", "MASTER_PORT")}
    environ |= {"PAI_HOME": str(home), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
           "-m", "flows.cli", "train-distributed", str(spec), "--no-track"]
    return subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_launches_the_cli(tmp_path):
    """`torchrun --standalone --nproc_per_node=2 -m flows.cli train-distributed SPEC`: rank 0 alone
    prints and writes, the rounds match one process's, and a second launch computes nothing."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(json.dumps(tiny_raw(**PLAN)))
    first = _torchrun(spec, tmp_path / "home")
    assert first.returncode == 0, first.stderr[-3000:]
    plan = build_plan(tiny_spec(**PLAN))
    assert first.stdout.count(f"{len(plan.nodes)} stages computed, 0 reused, 2 processes") == 1, first.stdout
    store, one = Store(tmp_path / "home" / "store"), run_specs([tiny_spec(**PLAN)], Store(tmp_path / "single"))
    for rnd in plan.rounds:
        ev = store.get("evaluate", rnd.evaluate.key).info
        assert ev.test_loss == pytest.approx(one.refs[rnd.evaluate.key].info.test_loss, rel=1e-5)
    again = _torchrun(spec, tmp_path / "home")
    assert again.returncode == 0 and f"0 stages computed, {len(plan.nodes)} reused" in again.stdout, again.stdout
