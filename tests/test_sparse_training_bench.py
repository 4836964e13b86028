"""benchmarks/sparse_training.py: the CSR autograd function computes what the dense masked layer
computes (forward, grad_x, grad of the live weights; max |Δ| ≤ 1e-5 · max |reference|, float32),
one SET update keeps each layer's live count, drops the k smallest |w|, never regrows a
just-dropped position, carries kept values and momentum over and starts new weights at zero with
zero momentum, identically in both variants; and the --quick run returns a row per sparsity. No
wall-clock time is asserted, only that the times and ratios are positive."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sparse_training_bench", ROOT / "benchmarks/sparse_training.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look the module up by name
_spec.loader.exec_module(bench)

RTOL = 1e-5  # relative to the largest reference entry
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= RTOL * float(b.abs().max())


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def random_layer(out=37, inp=53, density=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    lin = bench.sample_dead(torch.empty(0, dtype=torch.int64), out * inp, round(density * out * inp), g).sort().values
    mask = torch.zeros(out * inp, dtype=torch.bool)
    mask[lin] = True
    return w, mask.view(out, inp), lin, g


@pytest.mark.parametrize("x_grad", [True, False])
def test_function_equals_dense_masked(x_grad):
    w, mask, lin, g = random_layer()
    lin = lin[(lin // w.shape[1] != 0) & (lin % w.shape[1] != 1)]  # an empty row and an empty column
    mask = torch.zeros_like(mask).reshape(-1).index_fill_(0, lin, True).view_as(mask)
    x = torch.randn(16, w.shape[1], generator=g)
    gy = torch.randn(16, w.shape[0], generator=g)

    xs = x.clone().requires_grad_(x_grad)
    pattern = bench.CSRPattern.from_linear(lin, tuple(w.shape))
    values = w.reshape(-1)[lin].clone().requires_grad_(True)
    y = bench.SparseLinearFunction.apply(xs, values, pattern)
    (y * gy).sum().backward()

    xd = x.clone().requires_grad_(x_grad)
    wd = (w * mask).requires_grad_(True)
    y_ref = xd @ wd.t()
    (y_ref * gy).sum().backward()
    grad_w_masked = wd.grad * mask  # MaskEnforcer.before_step

    assert close(y, y_ref)
    assert close(values.grad, grad_w_masked.reshape(-1)[lin])
    if x_grad:
        assert close(xs.grad, xd.grad)
    else:
        assert xs.grad is None


def test_function_gradcheck_float64():
    w, mask, lin, g = random_layer(out=6, inp=5, density=0.4)
    pattern = bench.CSRPattern.from_linear(lin, tuple(w.shape))
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    values = w.reshape(-1)[lin].double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, v: bench.SparseLinearFunction.apply(a, v, pattern), (x, values))


def test_pattern_transpose_and_dense():
    w, mask, lin, _ = random_layer()
    p = bench.CSRPattern.from_linear(lin[torch.randperm(lin.numel())], tuple(w.shape))  # unsorted in
    assert torch.equal(p.lin, lin)
    vals = w.reshape(-1)[lin]
    assert torch.equal(p.csr(vals).to_dense(), w * mask)
    assert torch.equal(p.csr_t(vals).to_dense(), (w * mask).t())


@pytest.mark.parametrize("numel,live,k", [(10_000, 500, 150), (100, 60, 30), (100, 0, 7)])
def test_sample_dead(numel, live, k):
    g = torch.Generator().manual_seed(1)
    live_idx = torch.randperm(numel, generator=g)[:live].sort().values
    got = bench.sample_dead(live_idx, numel, k, g)
    assert got.numel() == k == got.unique().numel()
    assert not torch.isin(got, live_idx).any()
    assert int(got.min()) >= 0 and int(got.max()) < numel
    with pytest.raises(ValueError):
        bench.sample_dead(live_idx, numel, numel - live + 1, g)


def test_sample_dead_is_not_biased_to_low_positions():
    g = torch.Generator().manual_seed(2)
    got = torch.cat([bench.sample_dead(torch.empty(0, dtype=torch.int64), 1000, 100, g) for _ in range(50)])
    assert 400 < float(got.float().mean()) < 600  # uniform on [0, 1000): mean 499.5


def test_one_set_update_both_variants():
    cfg = bench.Config(in_features=20, hidden=[30, 40], classes=5, batch=8, iters=3, repeats=1)
    base = bench.dense_mlp(cfg)
    lins = bench.initial_masks(cfg, base, 0.2)
    b = bench.Sparse(cfg, base, lins)
    a = bench.DenseMasked(cfg, base, lins)
    data = bench.make_data(cfg)
    for x, y in data:  # build up momentum, no update yet
        a.step(x, y), b.step(x, y)
    before_lin = {i: l.clone() for i, l in b.masks().items()}
    before_w = b.weights()
    before_buf = {i: b.opt.state[b.model[i].values]["momentum_buffer"].clone() for i in b.ids}
    a.mask_update()
    b.mask_update()
    for i in b.ids:
        old, new = before_lin[i], b.masks()[i]
        assert new.numel() == old.numel(), "the live count is kept exactly"
        k = int(cfg.drop_fraction * old.numel())
        dropped = old[~torch.isin(old, new)]
        grown = new[~torch.isin(new, old)]
        assert dropped.numel() == grown.numel() == k
        assert not torch.isin(grown, dropped).any(), "a just-dropped position is never regrown"
        # the k smallest |w| were dropped
        mags = before_w[i].reshape(-1)[old].abs()
        assert float(before_w[i].reshape(-1)[dropped].abs().max()) <= float(mags.sort().values[k])
        # kept weights keep value and momentum; new ones start at zero with zero momentum
        layer = b.model[i]
        w_now = layer.to_dense().reshape(-1)
        kept = old[torch.isin(old, new)]
        assert torch.equal(w_now[kept], before_w[i].reshape(-1)[kept])
        assert torch.equal(w_now[grown], torch.zeros(k))
        buf_new = torch.zeros(layer.numel)
        buf_new[new] = b.opt.state[layer.values]["momentum_buffer"]
        buf_old = torch.zeros(layer.numel)
        buf_old[old] = before_buf[i]
        assert torch.equal(buf_new[kept], buf_old[kept])
        assert torch.equal(buf_new[grown], torch.zeros(k))
        # the rebuilt CSR structures hold the same matrix
        assert torch.equal(layer.pattern.csr(layer.values.detach()).to_dense(), layer.to_dense())
        assert torch.equal(layer.pattern.csr_t(layer.values.detach()).to_dense(), layer.to_dense().t())
        # the dense masked variant made the same choice and zeroed the grown momentum
        assert torch.equal(a.masks()[i], new)
        wa = a.model[i].weight
        assert torch.equal(wa.detach().reshape(-1)[grown], torch.zeros(k))
        assert torch.equal(a.opt.state[wa]["momentum_buffer"].reshape(-1)[grown], torch.zeros(k))
        assert int((wa.detach() != 0).sum()) <= new.numel()
    # and training goes on in lockstep after the update
    for x, y in data:
        la, lb = a.step(x, y), b.step(x, y)
    assert abs(la - lb) <= 1e-5 * abs(la)
    same, diff = bench.lockstep(a, b)
    assert same and diff <= 1e-5


def test_quick_run(tmp_path):
    out = tmp_path / "rows.json"
    rows = bench.main(["--quick", "--threads", "1", "--json", str(out)])
    assert rows[0]["sparsity"] == 0.0 and rows[0]["dense_s"] > 0 and rows[0]["forward_dense_s"] > 0
    sparse_rows = rows[1:]
    assert [r["sparsity"] for r in sparse_rows] == [0.9, 0.98, 0.995]
    for r in sparse_rows:
        for key in ("dense_masked_s", "sparse_s", "speedup", "forward_dense_s", "forward_sparse_s",
                    "forward_speedup", "mask_update_dense_masked_s", "mask_update_sparse_s", "pai_core_set_update_s"):
            assert r[key] > 0, key
        assert r["mask_update_sparse_s"] < r["sparse_s"] and r["mask_update_dense_masked_s"] < r["dense_masked_s"]
        assert r["live_weights"] == sum(round((1 - r["sparsity"]) * n) for n in (784 * 256, 256 * 256))
        assert r["warmup_masks_equal"] and r["warmup_max_rel_weight_diff"] <= 1e-5
    saved = json.loads(out.read_text())
    assert saved["quick"] and saved["config"]["hidden"] == [256, 256] and saved["threads"] == 1
    assert len(saved["rows"]) == 4


def test_verdict():
    assert bench.verdict([(0.9, 0.5), (0.98, 1.0), (0.995, 0.8)], "t") == "t: sparse is never faster here (slower at 90 %, 99.5 %)"
    assert bench.verdict([(0.9, 0.5), (0.98, 1.3), (0.995, 2.0)], "t") == "t: sparse is faster from 98 % sparsity on, slower at 90 %"
    assert bench.verdict([(0.9, 1.2), (0.98, 1.3), (0.995, 2.0)], "t").startswith("t: sparse is faster at every")
    assert bench.verdict([(0.9, 1.2), (0.98, 1.0), (0.995, 0.5)], "t") == "t: sparse is faster at 90 %, slower at 99.5 %"
