"""Training is a pure function of the iteration: resume and rewinding replay it exactly."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_spec
from pai_core.data import load
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.specs import TrainSpec
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store
from pai_core.training import Callback, lr_at, train

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


class Crash(Callback):
    """A kill in the middle of epoch 3, after epoch 2's checkpoint was written."""

    def after_backward(self, state):
        if state.it == 45:
            raise KeyboardInterrupt("simulated kill mid epoch 3")


class Epochs(Callback):
    def __init__(self):
        self.seen = []

    def on_epoch_end(self, state, row):
        self.seen.append(row["epoch"])


def test_crash_resumes_from_the_last_checkpoint(tmp_path):
    data, full = fresh()
    train(full, data, SGD, batch_size=50, order_seed=1)
    ckpt = tmp_path / "c.ckpt.pt"
    _, crashed = fresh()

    with pytest.raises(KeyboardInterrupt):
        train(crashed, data, SGD, batch_size=50, order_seed=1, checkpoint=ckpt, callbacks=[Crash()])
    assert torch.load(ckpt, weights_only=True)["iteration"] == 2 * 20  # 1000 train examples / batch 50

    _, resumed = fresh()  # a new process: weights come only from the checkpoint
    epochs = Epochs()
    out = train(resumed, data, SGD, batch_size=50, order_seed=1, checkpoint=ckpt, callbacks=[epochs])
    assert epochs.seen == [3.0], "only the unfinished epoch runs again"
    assert [r["epoch"] for r in out.history] == [1.0, 2.0, 3.0]
    assert same_weights(full, resumed)


class StopAfter(Callback):
    """Requests a stop at an epoch end and carries a counter across a resume."""

    def __init__(self, epoch):
        self.epoch, self.calls = epoch, 0

    def on_epoch_end(self, state, row):
        self.calls += 1
        state.stop = row["epoch"] >= self.epoch

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, s):
        self.calls = s["calls"]


def test_a_callback_can_stop_training_and_its_state_survives_a_resume(tmp_path):
    data, model = fresh()
    out = train(model, data, SGD, batch_size=50, order_seed=1, callbacks=[StopAfter(2)])
    assert out.stopped_early and out.iteration == 40 and [r["epoch"] for r in out.history] == [1.0, 2.0]
    ckpt = tmp_path / "s.ckpt.pt"
    _, crashed = fresh()
    with pytest.raises(KeyboardInterrupt):
        train(crashed, data, SGD, batch_size=50, order_seed=1, checkpoint=ckpt, callbacks=[StopAfter(9), Crash()])
    resumed_cb = StopAfter(3)
    _, resumed = fresh()
    out = train(resumed, data, SGD, batch_size=50, order_seed=1, checkpoint=ckpt, callbacks=[resumed_cb, Callback()])
    assert resumed_cb.calls == 3, "the two epochs before the crash were restored from the checkpoint"
    assert out.iteration == 60 and out.stopped_early


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
        assert refs[start.key].info.iteration == rewind_iter == out.iteration
    # The retrain continues from there: same steps as training the rewind point under the mask.
    data, model = fresh()
    model.load_state_dict(stored["model"])
    mask = rt.store.load(refs[plan.rounds[1].mask.key])["mask"]
    train(model, data, spec.retrain_spec, batch_size=50, order_seed=spec.order_seed, mask=mask,
          start_iter=rewind_iter, optimizer_state=stored.get("optimizer"))
    final = rt.store.load(refs[retrain.key])["model"]
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())


class DropoutNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 64), torch.nn.ReLU(),
                                        torch.nn.Dropout(0.5), torch.nn.Linear(64, 10))

    def forward(self, x):
        return self.body(x)


def dropout_net():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return DropoutNet()


def test_dropout_draws_are_a_function_of_the_iteration(tmp_path):
    """A model with dropout resumes and rewinds bit for bit, whatever the process's generator did
    before; a model without dropout leaves the global generator alone."""
    data = load("synthetic")
    full = dropout_net()
    train(full, data, SGD, batch_size=50, order_seed=3)
    torch.rand(1000)  # the process's global generator moves on: must not matter
    part = dropout_net()
    first = train(part, data, SGD, batch_size=50, order_seed=3, stop_iter=37)
    train(part, data, SGD, batch_size=50, order_seed=3, start_iter=37, optimizer_state=first.optimizer_state)
    assert same_weights(full, part)
    before = torch.get_rng_state()
    train(dropout_net(), data, SGD, batch_size=50, order_seed=3, stop_iter=5)
    assert torch.equal(torch.get_rng_state(), before), "the caller's generator is restored"
    other = dropout_net()
    train(other, data, SGD, batch_size=50, order_seed=4)
    assert not same_weights(full, other), "another order seed draws other masks"


@pytest.mark.parametrize("optimizer, after", [("adam", 1.0 - 0.1), ("adamw", 1.0 * (1 - 0.1 * 0.5) - 0.1)])
def test_adamw_decays_the_weight_apart_from_the_gradient(optimizer, after):
    """One step from w = 1 with gradient 0.5, lr 0.1, weight decay 0.5. Adam adds wd·w to the
    gradient (g = 1), so its first step is -lr·g/|g|; AdamW shrinks w by lr·wd first, then takes
    the step of the gradient alone."""
    from pai_core.training import make_optimizer
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    opt = make_optimizer(model, TrainSpec(optimizer=optimizer, lr=0.1, weight_decay=0.5, epochs=1))
    model.weight.grad = torch.full_like(model.weight, 0.5)
    opt.step()
    assert model.weight.item() == pytest.approx(after, abs=1e-6)


def test_label_smoothing_moves_the_targets_by_epsilon_over_the_classes():
    """One full-batch SGD step of a linear net with and without ε: smoothed cross-entropy's logit
    gradient is softmax − ((1 − ε)·onehot + ε/C), so the weights differ by exactly
    −lr·ε·mean_b((onehot_b − 1/C) x_bᵀ), and the bias by −lr·ε·mean_b(onehot_b − 1/C)."""
    data = load("synthetic")
    n, c, lr, eps = len(data.train), data.num_classes, 0.5, 0.2
    after = {}
    for smoothing in (0.0, eps):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(data.train.x[0].numel(), c))
        train(net, data, TrainSpec(lr=lr, iterations=1, label_smoothing=smoothing), batch_size=n, order_seed=0)
        after[smoothing] = (net[1].weight.detach().clone(), net[1].bias.detach().clone())
    x = data.train.x.reshape(n, -1).double()
    target = torch.nn.functional.one_hot(data.train.y, c).double() - 1.0 / c
    torch.testing.assert_close((after[eps][0] - after[0.0][0]).double(), -lr * eps * target.T @ x / n,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close((after[eps][1] - after[0.0][1]).double(), -lr * eps * target.mean(0), rtol=0, atol=1e-6)


def test_label_smoothing_enters_the_train_key_only_when_set():
    base = build_plan(tiny_spec()).rounds[0].trained
    zero = build_plan(tiny_spec(train={"label_smoothing": 0.0})).rounds[0].trained
    set_ = build_plan(tiny_spec(train={"label_smoothing": 0.1})).rounds[0].trained
    assert base.key == zero.key != set_.key
    assert set_.inputs["start"].key == base.inputs["start"].key  # the init is shared
