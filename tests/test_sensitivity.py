"""pai_core.sensitivity and `pai sensitivity`: each trial prunes one unit alone, exactly
round(alive · d) of its survivors by |w| (ties to the lower index), the round's mask elsewhere;
the reported accuracy is that masked copy's; density 1 is the round; the caller's model is left
alone; the CLI writes, prints and logs it, and refuses bad options before any evaluation."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import tracked_tiny_run
from flows.cli import app
from pai_core import channel_graph, sensitivity as sens
from pai_core.data import Split
from pai_core.masks import apply_mask, dense_mask
from pai_core.models import build_model
from pai_core.training import evaluate

DENSITIES = (1.0, 0.75, 0.5, 0.3, 0.01)


def _mlp() -> tuple[nn.Module, dict[str, torch.Tensor], Split]:
    """6 -> 8 -> 3 with biases, a hand-made mask (neuron 0 of the hidden layer emptied, so its
    bias still reaches the next layer through fc2's column 0), 64 random examples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].bias.fill_(0.5)
    g = torch.Generator().manual_seed(1)
    mask = {"1.weight": torch.rand(8, 6, generator=g) < 0.7, "3.weight": torch.rand(3, 8, generator=g) < 0.6}
    mask["1.weight"][0] = False
    mask["3.weight"][:, 0] = True
    split = Split(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
    return model, mask, split


def _expected_keep(w: torch.Tensor, alive: torch.Tensor, d: float) -> torch.Tensor:
    """By hand: the survivors sorted by (-|w|, flat index), the first round(alive · d) kept."""
    flat_w, flat_a = w.detach().abs().reshape(-1).tolist(), alive.reshape(-1).tolist()
    idx = sorted((i for i, a in enumerate(flat_a) if a), key=lambda i: (-flat_w[i], i))
    keep = torch.zeros(len(flat_a), dtype=torch.bool)
    keep[idx[:round(len(idx) * d)]] = True
    return keep.reshape(alive.shape)


def _independent(model: nn.Module, mask: dict[str, torch.Tensor], split: Split) -> dict[str, float]:
    net = copy.deepcopy(model)
    apply_mask(net, mask)
    return evaluate(net, split)


def test_unstructured_trials_keep_round_alive_d_of_one_layer_and_report_its_own_accuracy():
    model, mask, split = _mlp()
    params = dict(model.named_parameters())
    trials = list(sens.trials(model, mask, DENSITIES))
    assert [(t.unit, t.density) for t in trials] == [(u, d) for u in ("1.weight", "3.weight") for d in DENSITIES]
    for t in trials:
        alive = int(mask[t.unit].sum())
        assert t.alive == alive and t.unit_size == mask[t.unit].numel()
        assert t.kept == int(t.mask[t.unit].sum()) == round(alive * t.density)
        assert torch.equal(t.mask[t.unit], _expected_keep(params[t.unit], mask[t.unit], t.density))
        for other in set(mask) - {t.unit}:
            assert torch.equal(t.mask[other], mask[other])
    assert trials[-1].kept == 0  # round(alive · 0.01) = 0: the layer emptied, still evaluated
    rows = sens.sensitivity(model, mask, split, DENSITIES)
    assert rows[0].unit == sens.BASELINE and rows[0].density == 1.0
    assert rows[0].kept == sum(int(m.sum()) for m in mask.values())
    base = _independent(model, mask, split)
    assert (rows[0].val_acc, rows[0].val_loss) == (base["acc"], base["loss"])
    for t, r in zip(trials, rows[1:], strict=True):
        m = _independent(model, t.mask, split)
        assert (r.unit, r.density, r.kept) == (t.unit, t.density, t.kept)
        assert (r.val_acc, r.val_loss) == (m["acc"], m["loss"])
    assert len({r.val_loss for r in rows}) > 2  # the trials did change the network


def test_ties_go_to_the_lower_index_among_the_survivors():
    model = nn.Sequential(nn.Linear(5, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(-1.0)
    mask = {"0.weight": torch.tensor([[False, True, True, True, True], [True, True, False, True, True]])}
    t = next(t for t in sens.trials(model, mask, [0.5]))
    # 8 survivors, 4 kept: the first four alive in flat order
    assert t.mask["0.weight"].tolist() == [[False, True, True, True, True], [False, False, False, False, False]]


@pytest.mark.parametrize("structure", ["unstructured", "filter"])
def test_density_one_reproduces_the_baseline_exactly(structure):
    model, mask, split = _mlp()
    rows = sens.sensitivity(model, mask, split, [1.0, 0.5], structure=structure)
    units = {r.unit for r in rows[1:]}
    assert units == ({"1.weight", "3.weight"} if structure == "unstructured" else {"1"})  # fc out: pinned
    for r in rows[1:]:
        if r.density == 1.0:
            assert (r.val_acc, r.val_loss) == (rows[0].val_acc, rows[0].val_loss)


def test_filter_trials_leave_groups_the_round_emptied_as_it_left_them():
    model, mask, _ = _mlp()
    # the emptied neuron 0 is not alive: 4 of the 7 others kept, and fc2's column 0 is not cut
    t = next(t for t in sens.trials(model, mask, [0.5], structure="filter"))
    assert (t.unit_size, t.alive, t.kept) == (8, 7, 4)
    assert t.mask["3.weight"][:, 0].all()
    dropped = [c for c in range(1, 8) if not t.mask["1.weight"][c].any()]
    assert len(dropped) == 3 and not t.mask["3.weight"][:, dropped].any()  # their readers cut with them
    cut = torch.isin(torch.arange(8), torch.tensor(dropped)).expand(3, 8)
    assert torch.equal(t.mask["3.weight"], mask["3.weight"] & ~cut)  # and nothing else of fc2


def _resnet() -> nn.Module:
    return build_model("resnet20", (3, 32, 32), 10, seed=0, width=0.25).eval()


def test_filter_pruning_the_residual_stream_removes_the_same_channels_in_every_conv_of_the_family():
    model = _resnet()
    mask = dense_mask(model)
    fam = "layer2.0.conv2"  # stage 2's stream: written by layer2.{0,1,2}.conv2 and the shortcut conv
    graph = channel_graph.trace(model)
    producers = graph.families[fam][0].layers
    assert len(producers) == 4 and "layer2.0.shortcut.0" in producers
    t = next(t for t in sens.trials(model, mask, [0.5], structure="filter") if t.unit == fam)
    assert (t.unit_size, t.alive, t.kept) == (8, 8, 4)
    # by hand: a channel's score is the L1 norm of its filters in every producing conv
    params = dict(model.named_parameters())
    score = sum(params[f"{n}.weight"].detach().abs().flatten(1).sum(1) for n in producers)
    expected_gone = set(sorted(range(8), key=lambda c: (-float(score[c]), c))[4:])
    for n in producers:
        rows = t.mask[f"{n}.weight"].flatten(1)
        gone = {c for c in range(8) if not rows[c].any()}
        assert gone == expected_gone and rows[sorted(set(range(8)) - gone)].all()
    # every reader of the stream loses those input channels: next blocks' conv1s, stage 3's entry
    for n in ("layer2.1.conv1", "layer2.2.conv1", "layer3.0.conv1", "layer3.0.shortcut.0"):
        cols = t.mask[f"{n}.weight"].transpose(0, 1).flatten(1)
        assert {c for c in range(8) if not cols[c].any()} == expected_gone
    touched = set(producers) | {"layer2.1.conv1", "layer2.2.conv1", "layer3.0.conv1", "layer3.0.shortcut.0"}
    for n, m in t.mask.items():
        if n.removesuffix(".weight") not in touched:
            assert m.all(), n


def test_the_callers_model_and_mask_are_unchanged():
    model = _resnet().train()
    g = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(m.shape, generator=g) < 0.8 for n, m in dense_mask(model).items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask_before = {n: m.clone() for n, m in mask.items()}
    split = Split(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
    rows = sens.sensitivity(model, mask, split, [0.5], structure="filter")
    assert len(rows) == 1 + len(channel_graph.trace(model).families)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights not masked, BN stats not updated
    assert all(torch.equal(mask_before[n], mask[n]) for n in mask)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(torch.matmul(y, y).mean((2, 3)))


@pytest.mark.parametrize("densities, structure, norm, message", [
    ([1.5], "unstructured", "l1", "--density: 1.5 is outside (0, 1]; allowed: numbers in (0, 1]"),
    ([0.5, 0.0], "unstructured", "l1", "--density: 0.0 is outside (0, 1]; allowed: numbers in (0, 1]"),
    ([float("nan")], "unstructured", "l1", "--density: nan is outside (0, 1]"),
    ([], "unstructured", "l1", "--density: none given"),
    ([0.5], "channel", "l1", "--structure: unknown 'channel'; allowed: unstructured, filter"),
    ([0.5], "filter", "l3", "--norm: unknown 'l3'; allowed: l1, l2, max"),
    ([0.5], "filter", "l1", "--structure filter: _Untraceable's channels cannot be grouped ("),
])
def test_bad_options_are_refused_before_any_evaluation(monkeypatch, densities, structure, norm, message):
    monkeypatch.setattr(sens, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    model = _Untraceable()
    with pytest.raises(sens.SensitivityRefused) as e:
        sens.sensitivity(model, dense_mask(model), Split(torch.zeros(1, 3, 5, 5), torch.zeros(1, dtype=torch.long)),
                         densities, structure, norm)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_markdown_has_a_row_per_unit_and_a_column_per_density():
    rows = [sens.Row(sens.BASELINE, 10, 8, 1.0, 8, 0.9, 0.3), sens.Row("a.weight", 6, 5, 0.5, 2, 0.8, 0.4),
            sens.Row("a.weight", 6, 5, 0.1, 0, 0.1, 2.0), sens.Row("b.weight", 4, 3, 0.5, 2, 0.85, 0.35),
            sens.Row("b.weight", 4, 3, 0.1, 0, 0.2, 1.9)]
    md = sens.markdown(rows)
    assert "val acc 90.00 %" in md and "8 of 10 weights kept" in md
    assert "| unit | size | alive | d=0.5 | d=0.1 |" in md
    assert "| a.weight | 6 | 5 | 80.00 | 10.00 |" in md and "| b.weight | 4 | 3 | 85.00 | 20.00 |" in md


def test_pai_sensitivity_prints_writes_and_logs_and_refuses_bad_options(pai_home, tmp_path, monkeypatch):
    path, client = tracked_tiny_run(pai_home, tmp_path)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["sensitivity", str(path), "-d", "1.0", "-d", "0.5", "-d", "0.05"],
                        env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    out = tmp_path / "sensitivity-tiny-round-1"  # the default folder
    assert {p.name for p in out.iterdir()} == {f"sensitivity.{e}" for e in ("json", "md", "png", "pdf", "svg")}
    data = json.loads((out / "sensitivity.json").read_text())
    rows = [sens.Row(**r) for r in data["rows"]]
    assert data["round"] == {"index": 1, "name": "round 1"} and data["structure"] == "unstructured"
    assert [r.unit for r in rows] == [sens.BASELINE] + [u for u in ("fc1.weight", "fc2.weight", "fc3.weight")
                                                         for _ in range(3)]
    base = rows[0]
    for r in rows[1:]:
        assert r.kept == round(r.alive * r.density)
        if r.density == 1.0:
            assert (r.val_acc, r.val_loss) == (base.val_acc, base.val_loss)
    md = (out / "sensitivity.md").read_text()
    assert md == sens.markdown(rows, md.splitlines()[0])
    fc1 = next(r for r in rows if r.unit == "fc1.weight")
    assert f"| fc1.weight | {fc1.unit_size} | {fc1.alive} | {100 * base.val_acc:.2f} |" in res.output
    assert "| unit | size | alive | d=1 | d=0.5 | d=0.05 |" in res.output
    rid = res.output.rsplit("logged to MLflow run ", 1)[1].split()[0]
    assert client.get_run(rid).info.run_name == "round 1"
    logged = {a.path for a in client.list_artifacts(rid, "sensitivity-unstructured")}
    assert logged == {f"sensitivity-unstructured/sensitivity.{e}" for e in ("md", "json", "png")}

    res = runner.invoke(app, ["sensitivity", str(path), "--structure", "filter", "-d", "0.5", "-o", "filt"])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "filt" / "sensitivity.json").read_text())["rows"]
    assert [(r["unit"], r["unit_size"], r["kept"]) for r in rows[1:]] == [("fc1", 300, 150), ("fc2", 100, 50)]

    import pai_core.training

    monkeypatch.setattr(pai_core.training, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    monkeypatch.setattr(sens, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    monkeypatch.setattr(channel_graph, "trace", lambda m: (_ for _ in ()).throw(
        channel_graph.ChannelGraphError("node 'matmul' (call_function matmul): channel mapping unknown")))
    for args, message in [
        (["-d", "1.5"], "--density: 1.5 is outside (0, 1]; allowed: numbers in (0, 1]"),
        (["-d", "0"], "--density: 0.0 is outside (0, 1]"),
        (["--structure", "channel"], "--structure: unknown 'channel'; allowed: unstructured, filter"),
        (["--structure", "filter"], "--structure filter: LeNet300100's channels cannot be grouped (node 'matmul'"),
        (["--round", "7"], "--round: no round 7 in this plan; rounds: 0 'dense', 1 'round 1'"),
        (["prune.rate=0.5"], "--round: round 'round 1' of tiny is not stored yet"),
    ]:
        res = runner.invoke(app, ["sensitivity", str(path), *args], env={"COLUMNS": "250"})
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output and len(res.output.strip().splitlines()) == 1, (args, res.output)
