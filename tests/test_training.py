"""Training is a pure function of the iteration: resume and rewinding replay it exactly."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_spec
from pai_core.data import load
from pai_core.models import build_model
from pai_core.plan import build_plan
from pai_core.specs import TrainSpec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.training import lr_at, train

SGD = TrainSpec(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=3,
                lr_schedule="step", milestones=(2,), warmup_iterations=5)


def fresh():
    data = load("synthetic")
    return data, build_model("lenet_300_100", data.in_shape, data.num_classes, seed=0)


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_split_run_equals_uninterrupted_run():
    """Rewinding restores weights, optimizer state, LR position and data order: training to
    k and then on from the stored state is bit-for-bit the uninterrupted trajectory."""
    data, full = fresh()
    train(full, data, SGD, batch_size=50, order_seed=3)
    _, part = fresh()
    first = train(part, data, SGD, batch_size=50, order_seed=3, stop_iter=37)
    assert first.iteration == 37
    train(part, data, SGD, batch_size=50, order_seed=3, start_iter=37, optimizer_state=first.optimizer_state)
    assert same_weights(full, part)


def test_crash_resumes_from_the_last_checkpoint(tmp_path):
    data, full = fresh()
    train(full, data, SGD, batch_size=50, order_seed=1)
    ckpt = tmp_path / "c.ckpt.pt"
    _, crashed = fresh()

    def crash(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt("simulated kill after epoch 2")

    with pytest.raises(KeyboardInterrupt):
        train(crashed, data, SGD, batch_size=50, order_seed=1, checkpoint=ckpt, on_epoch=crash)
    assert torch.load(ckpt, weights_only=True)["iteration"] == 2 * 20  # 1000 train examples / batch 50

    _, resumed = fresh()  # a new process: weights come only from the checkpoint
    epochs_seen = []
    out = train(resumed, data, SGD, batch_size=50, order_seed=1, checkpoint=ckpt,
                on_epoch=lambda r: epochs_seen.append(r["epoch"]))
    assert epochs_seen == [3.0], "only the unfinished epoch runs again"
    assert [r["epoch"] for r in out.history] == [1.0, 2.0, 3.0]
    assert same_weights(full, resumed)


def test_lr_schedule_positions():
    ipe = 10
    spec = TrainSpec(lr=1.0, epochs=4, lr_schedule="step", milestones=(2, 3), gamma=0.1, warmup_iterations=4)
    assert [lr_at(i, spec, ipe, 40) for i in (0, 3, 19, 20, 30)] == pytest.approx([0.25, 1.0, 1.0, 0.1, 0.01])
    cos = TrainSpec(lr=1.0, iterations=100, lr_schedule="cosine")
    assert lr_at(0, cos, ipe, 100) == 1.0 and lr_at(50, cos, ipe, 100) == pytest.approx(0.5)


@pytest.mark.parametrize("rewind_iter", [0, 7])
def test_lth_rewinds_to_the_stored_point(tmp_path, rewind_iter):
    spec = tiny_spec(prune={"rewind_iter": rewind_iter})
    plan = build_plan(spec)
    rt = Runtime(Store(tmp_path), "cpu")
    refs = run_plan(plan.nodes, rt)
    retrain = plan.rounds[1].trained
    start = retrain.inputs["start"]
    stored = rt.store.load(refs[start.key])
    if rewind_iter == 0:
        assert start is plan.rounds[0].trained.inputs["start"], "k = 0 rewinds to the init artifact itself"
        assert stored.get("optimizer") is None
    else:
        # The stored rewind point equals the pretrain trajectory at k, bit for bit.
        data, model = fresh()
        out = train(model, data, spec.train, batch_size=50, order_seed=spec.order_seed, stop_iter=rewind_iter)
        assert all(torch.equal(stored["model"][k], v) for k, v in model.state_dict().items())
        assert refs[start.key].info["iteration"] == rewind_iter == out.iteration
    # The retrain continues from there: same steps as training the rewind point under the mask.
    data, model = fresh()
    model.load_state_dict(stored["model"])
    mask = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    train(model, data, spec.retrain_spec, batch_size=50, order_seed=spec.order_seed, mask=mask,
          start_iter=rewind_iter, optimizer_state=stored.get("optimizer"))
    final = rt.store.load(refs[retrain.key])["model"]
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())
