"""Is sparse training faster? One SET epoch with sparse matmuls against the dense masked epoch, CPU.

The survey doubts the "sparse training saves time" claim (SNFS and friends report FLOPs, not
seconds). This measures seconds, on a wide MLP, 784 → 4096 → 4096 → 10 with ReLU by default
(`--in-features`, `--hidden`, `--classes`). Every layer but the 10-way head is sparse at the
target density (a uniformly random mask, the same count in each layer), the head stays dense as
in most papers; biases are dense. Data: random MNIST-shaped inputs (standard normal) and random
labels, generated in this process from a seeded torch.Generator, outside the timings. Training:
cross-entropy, SGD lr 0.1, momentum 0.9, batch 128. An "epoch" is `--iters` iterations (default
100) followed by one SET mask update.

Variants, same initial weights, same mask, same batches, same drop/grow choices:

* dense (reference): the plain dense MLP, no mask.
* dense masked: what pai-flow does today (`pai_core.masks.MaskEnforcer`, used as is): dense
  `nn.Linear` weights, dense forward and backward, the gradient multiplied by the mask before
  the SGD step and the weight after it. The mask update only edits the mask (and zeroes the
  momentum of the grown weights, as `pai_core.dynamic` does).
* sparse: each sparse layer holds only its live weights, a CSR matrix whose values vector is the
  trainable parameter, so SGD keeps momentum for live weights only. `SparseLinearFunction`:
  forward y = (W_csr @ xᵀ)ᵀ with `torch.sparse.mm` (sparse operand on the left);
  backward grad_x = (Wᵀ_csr @ grad_yᵀ)ᵀ with a second, transposed CSR structure kept next to the
  first (its values are a gather `values[perm_t]` per backward), and
  grad_values = `torch.sparse.sampled_addmm(W_csr, grad_yᵀ, x, beta=0)`, the dense-dense
  product sampled at the live positions. These were the fastest correct choices among the
  alternatives tried on torch 2.14 / CPU (dense @ CSR, CSC from `W.t()`, int32 indices, a
  chunked gather-multiply-sum for grad_values: 10-50x slower than sampled_addmm).
  The mask update rebuilds both CSR structures and carries the kept values and momentum over.

SET update (Mocanu et al. 2018, ζ = 0.3; the drop/grow rule shared by both variants): in each
sparse layer drop the k = ⌊0.3 · live⌋ live weights of smallest |w| (ties by position), grow k
at uniformly random positions that were dead before the update (a just-dropped position is
never regrown in the same update: `regrow_dropped=False` in pai_core.dynamic's terms), new
weights zero with zero momentum. Positions are drawn by rejection against the sorted live
indices, O(k log nnz), never touching all the layer's positions. The update is timed inside the
epoch and reported separately. For context, one update of pai-flow's own
`pai_core.dynamic.DynamicSparsity` (SET, same options) on the dense masked model is timed too.

Per sparsity (90 / 98 / 99.5 % by default): 1 warm-up epoch of each variant (after which the
two are checked to agree: same masks, weights equal to float rounding), then `--repeats` (5)
epochs of each, interleaved A B / B A to cancel this machine's drift; the table shows medians.
Forward-only: inference (no_grad) over the epoch's batches, same scheme. "Faster" in the
conclusion means a median speedup of at least 1.1; within 10 % is called even.

    python benchmarks/sparse_training.py                       # the full sizes (minutes)
    python benchmarks/sparse_training.py --quick               # tiny sizes, a few seconds
    python benchmarks/sparse_training.py --threads 1 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from pai_core.dynamic import DynamicSparsity  # noqa: E402
from pai_core.masks import MaskEnforcer  # noqa: E402

warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")


# --------------------------------------------------------------- the sparse layer

@dataclass(frozen=True)
class CSRPattern:
    """Where a (rows × cols) matrix's live weights are, in CSR order, and its transpose's CSR.

    `lin` holds the sorted linear indices row · cols + col, so the values vector is in CSR
    order. The transposed CSR (cols × rows) reads its values as `values[perm_t]`.
    """
    shape: tuple[int, int]
    lin: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor
    crow_t: torch.Tensor
    col_t: torch.Tensor
    perm_t: torch.Tensor

    @classmethod
    def from_linear(cls, lin: torch.Tensor, shape: tuple[int, int]) -> CSRPattern:
        lin = lin.sort().values if lin.numel() > 1 and not bool((lin[1:] > lin[:-1]).all()) else lin
        n_rows, n_cols = shape
        rows, cols = lin // n_cols, lin % n_cols
        crow = torch.zeros(n_rows + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
        perm_t = torch.sort(cols, stable=True).indices  # by column, rows ascending within each
        crow_t = torch.zeros(n_cols + 1, dtype=torch.int64)
        crow_t[1:] = torch.bincount(cols, minlength=n_cols).cumsum(0)
        return cls(tuple(shape), lin, crow, cols, crow_t, rows[perm_t].contiguous(), perm_t)

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow_t, self.col_t, values[self.perm_t],
                                       (self.shape[1], self.shape[0]), check_invariants=False)


class SparseLinearFunction(torch.autograd.Function):
    """y = x @ Wᵀ for W = csr(pattern, values); gradients for x and for the values only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, pattern: CSRPattern) -> torch.Tensor:
        ctx.save_for_backward(x, values)
        ctx.pattern = pattern
        return torch.sparse.mm(pattern.csr(values), x.t()).t()

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, values = ctx.saved_tensors
        p: CSRPattern = ctx.pattern
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.sparse.mm(p.csr_t(values), grad_y.t()).t()
        if ctx.needs_input_grad[1]:
            # grad_values[k] = Σ_b grad_y[b, row_k] · x[b, col_k]: (grad_yᵀ @ x) sampled at the pattern
            grad_values = torch.sparse.sampled_addmm(p.csr(values), grad_y.t(), x, beta=0.0).values()
        return grad_x, grad_values, None


class SparseLinear(nn.Module):
    """A Linear layer (out × in) holding only its live weights; `values` is the parameter."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, lin: torch.Tensor):
        super().__init__()
        self.pattern = CSRPattern.from_linear(lin, tuple(weight.shape))
        self.values = nn.Parameter(weight.detach().reshape(-1)[self.pattern.lin].clone())
        self.bias = nn.Parameter(bias.detach().clone())

    @property
    def numel(self) -> int:
        return self.pattern.shape[0] * self.pattern.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SparseLinearFunction.apply(x, self.values, self.pattern) + self.bias

    def to_dense(self) -> torch.Tensor:
        w = torch.zeros(self.numel)
        w[self.pattern.lin] = self.values.detach()
        return w.view(self.pattern.shape)


# --------------------------------------------------------------------- the SET rule

def sample_dead(live: torch.Tensor, numel: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct positions of [0, numel) not in `live` (sorted), uniformly at random.

    Rejection sampling: draw uniformly, discard live positions (binary search) and repeats
    (keeping first occurrences in draw order, so the result is a uniform k-subset), repeat
    until k. O(k log nnz) while k is at most half of the dead positions; above that (only on
    tiny layers) it enumerates the dead positions.
    """
    dead = numel - live.numel()
    if k > dead:
        raise ValueError(f"cannot grow {k} among {dead} dead positions")
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if 2 * k > dead:
        is_dead = torch.ones(numel, dtype=torch.bool)
        is_dead[live] = False
        cand = is_dead.nonzero().squeeze(1)
        return cand[torch.randperm(cand.numel(), generator=gen)[:k]]
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        need = k - chosen.numel()
        draw = torch.randint(numel, (int(need * numel / dead * 1.25) + 16,), generator=gen)
        if live.numel():
            pos = torch.searchsorted(live, draw).clamp_(max=live.numel() - 1)
            draw = draw[live[pos] != draw]
        both = torch.cat([chosen, draw])
        uniq, inverse = torch.unique(both, return_inverse=True)
        first = torch.full((uniq.numel(),), both.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(both.numel()), reduce="amin")
        chosen = uniq[first.argsort()][:k]  # in order of first draw
    return chosen


def set_choice(lin: torch.Tensor, values: torch.Tensor, numel: int, fraction: float,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SET on one layer: (offsets into lin/values of the k smallest |w|, k new positions)."""
    k = min(int(fraction * lin.numel()), numel - lin.numel())
    drop = torch.sort(values.abs(), stable=True).indices[:k]
    return drop, sample_dead(lin, numel, k, gen)


# ------------------------------------------------------------------ the two variants

@dataclass
class Config:
    in_features: int = 784
    hidden: list[int] = field(default_factory=lambda: [4096, 4096])
    classes: int = 10
    batch: int = 128
    iters: int = 100
    repeats: int = 5
    sparsities: list[float] = field(default_factory=lambda: [0.9, 0.98, 0.995])
    drop_fraction: float = 0.3
    lr: float = 0.1
    momentum: float = 0.9
    seed: int = 0
    threads: int = 0  # 0: torch's default


def dense_mlp(cfg: Config) -> nn.Sequential:
    torch.manual_seed(cfg.seed)  # nn.Linear's default init, the same for every variant
    sizes = [cfg.in_features, *cfg.hidden, cfg.classes]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def sparse_layer_ids(model: nn.Sequential) -> list[int]:
    lin = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    return lin[:-1]  # the head stays dense


def initial_masks(cfg: Config, model: nn.Sequential, density: float) -> dict[int, torch.Tensor]:
    """Per sparse layer, the sorted linear indices of round(density · size) random positions."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    out = {}
    for i in sparse_layer_ids(model):
        numel = model[i].weight.numel()
        out[i] = sample_dead(torch.empty(0, dtype=torch.int64), numel, max(1, round(density * numel)), gen).sort().values
    return out


class Variant:
    """A model, its SGD optimizer, and how it does one step and one SET update."""
    name = ""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(cfg.seed + 2)  # the SET draws, the same in both

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.before_step()
        self.opt.step()
        self.after_step()
        return loss.item()

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def mask_update(self) -> None:
        pass

    def masks(self) -> dict[int, torch.Tensor]:
        return {}

    def weights(self) -> dict[int, torch.Tensor]:
        return {}


class Dense(Variant):
    name = "dense"

    def __init__(self, cfg: Config, model: nn.Sequential):
        super().__init__(cfg)
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)


class DenseMasked(Dense):
    """pai-flow's way: dense weights, MaskEnforcer before and after the step."""
    name = "dense masked"

    def __init__(self, cfg: Config, model: nn.Sequential, lins: dict[int, torch.Tensor]):
        super().__init__(cfg, model)
        self.ids = list(lins)
        mask = {}
        for i, lin in lins.items():
            m = torch.zeros(model[i].weight.numel(), dtype=torch.bool)
            m[lin] = True
            mask[f"{i}.weight"] = m.view_as(model[i].weight)
        self.bool_mask = mask
        apply = MaskEnforcer(model, mask)
        self.enforcer = apply
        apply.after_step()  # w' = m ⊙ w
        self.float_mask = {id(p): m for p, m in apply.pairs}

    def before_step(self) -> None:
        self.enforcer.before_step()

    def after_step(self) -> None:
        self.enforcer.after_step()

    @torch.no_grad()
    def mask_update(self) -> None:
        for i in self.ids:
            w = self.model[i].weight
            m = self.float_mask[id(w)].view(-1)
            lin = m.nonzero().squeeze(1)
            drop, grow = set_choice(lin, w.view(-1)[lin], w.numel(), self.cfg.drop_fraction, self.gen)
            dropped = lin[drop]
            m[dropped] = 0.0
            m[grow] = 1.0
            w.view(-1)[dropped] = 0.0
            w.view(-1)[grow] = 0.0  # zero init (dead weights are already 0)
            buf = self.opt.state.get(w, {}).get("momentum_buffer")
            if buf is not None:
                buf.view(-1)[grow] = 0.0  # a new connection starts without momentum

    def masks(self) -> dict[int, torch.Tensor]:
        return {i: self.float_mask[id(self.model[i].weight)].view(-1).nonzero().squeeze(1) for i in self.ids}

    def weights(self) -> dict[int, torch.Tensor]:
        return {i: self.model[i].weight.detach().clone() for i in self.ids}


class Sparse(Variant):
    """CSR layers with the live values as parameters; momentum for live weights only."""
    name = "sparse"

    def __init__(self, cfg: Config, dense: nn.Sequential, lins: dict[int, torch.Tensor]):
        super().__init__(cfg)
        layers = [SparseLinear(m.weight, m.bias, lins[i]) if i in lins else copy.deepcopy(m)
                  for i, m in enumerate(dense)]
        self.model = nn.Sequential(*layers)
        self.ids = list(lins)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum)

    @torch.no_grad()
    def mask_update(self) -> None:
        for i in self.ids:
            layer: SparseLinear = self.model[i]
            p, vals = layer.pattern, layer.values
            drop, grow = set_choice(p.lin, vals, layer.numel, self.cfg.drop_fraction, self.gen)
            keep = torch.ones(p.lin.numel(), dtype=torch.bool)
            keep[drop] = False
            lin = torch.cat([p.lin[keep], grow])
            order = lin.argsort()
            zeros = torch.zeros(grow.numel())
            vals.copy_(torch.cat([vals[keep], zeros])[order])  # same count: the parameter stays
            buf = self.opt.state.get(vals, {}).get("momentum_buffer")
            if buf is not None:
                buf.copy_(torch.cat([buf[keep], zeros])[order])
            layer.pattern = CSRPattern.from_linear(lin[order], p.shape)

    def masks(self) -> dict[int, torch.Tensor]:
        return {i: self.model[i].pattern.lin for i in self.ids}

    def weights(self) -> dict[int, torch.Tensor]:
        return {i: self.model[i].to_dense() for i in self.ids}


# ------------------------------------------------------------------------ timing

def make_data(cfg: Config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    return [(torch.randn(cfg.batch, cfg.in_features, generator=gen),
             torch.randint(cfg.classes, (cfg.batch,), generator=gen)) for _ in range(cfg.iters)]


def epoch(v: Variant, data, update: bool = True) -> tuple[float, float, float]:
    """(seconds for the epoch, of which the mask update, last loss)."""
    t0 = time.perf_counter()
    for x, y in data:
        loss = v.step(x, y)
    t_up = 0.0
    if update:
        t1 = time.perf_counter()
        v.mask_update()
        t_up = time.perf_counter() - t1
    return time.perf_counter() - t0, t_up, loss


@torch.no_grad()
def forward_pass(v: Variant, data) -> float:
    t0 = time.perf_counter()
    for x, _ in data:
        v.model(x)
    return time.perf_counter() - t0


def pai_core_update_seconds(cfg: Config, v: DenseMasked) -> float:
    """One update of pai-flow's own DynamicSparsity (SET, zero init, no regrowing of dropped)."""
    model = copy.deepcopy(v.model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    mask = {f"{i}.weight": v.float_mask[id(v.model[i].weight)].bool().view_as(v.model[i].weight) for i in v.ids}
    upd = DynamicSparsity("set", 1, cfg.drop_fraction, 10**9, cfg.seed, anneal="constant", grow_init="zero",
                          regrow_dropped=False)
    t0 = time.perf_counter()
    upd(1, model, opt, mask)
    return time.perf_counter() - t0


def lockstep(a: DenseMasked, b: Sparse) -> tuple[bool, float]:
    """Same masks? max |w_a − w_b| / max |w_a| over the sparse layers."""
    same = all(torch.equal(a.masks()[i], b.masks()[i]) for i in a.ids)
    wa, wb = a.weights(), b.weights()
    diff = max(float((wa[i] - wb[i]).abs().max() / wa[i].abs().max().clamp_min(1e-30)) for i in a.ids)
    return same, diff


def measure(cfg: Config, data) -> list[dict]:
    rows = []
    ref = Dense(cfg, dense_mlp(cfg))
    epoch(ref, data, update=False)
    forward_pass(ref, data)
    t_ep = [epoch(ref, data, update=False)[0] for _ in range(cfg.repeats)]
    t_fw = [forward_pass(ref, data) for _ in range(cfg.repeats)]
    rows.append({"sparsity": 0.0, "variant": "dense (no mask)", "dense_s": statistics.median(t_ep),
                 "forward_dense_s": statistics.median(t_fw), "epochs_s": {"dense": t_ep},
                 "last_loss": epoch(ref, data[:1], update=False)[2]})
    for sp in cfg.sparsities:
        base = dense_mlp(cfg)
        lins = initial_masks(cfg, base, 1 - sp)
        b = Sparse(cfg, base, lins)  # copies the weights before the masked variant zeroes them
        a = DenseMasked(cfg, base, lins)
        live = sum(int(l.numel()) for l in lins.values())
        total = sum(base[i].weight.numel() for i in lins)
        # warm-up: one epoch each (from the same state), then the agreement check
        _, _, loss_a = epoch(a, data)
        _, _, loss_b = epoch(b, data)
        same_masks, wdiff = lockstep(a, b)
        forward_pass(a, data), forward_pass(b, data)
        ta, tb, ua, ub, fa, fb = [], [], [], [], [], []
        for r in range(cfg.repeats):
            for v in ((a, b) if r % 2 == 0 else (b, a)):
                t, u, loss = epoch(v, data)
                (ta if v is a else tb).append(t)
                (ua if v is a else ub).append(u)
            for v in ((a, b) if r % 2 == 0 else (b, a)):
                (fa if v is a else fb).append(forward_pass(v, data))
        med = statistics.median
        rows.append({
            "sparsity": sp, "density": 1 - sp, "live_weights": live, "sparse_layer_weights": total,
            "dense_masked_s": med(ta), "sparse_s": med(tb), "speedup": med(ta) / med(tb),
            "mask_update_dense_masked_s": med(ua), "mask_update_sparse_s": med(ub),
            "forward_dense_s": med(fa), "forward_sparse_s": med(fb), "forward_speedup": med(fa) / med(fb),
            "pai_core_set_update_s": pai_core_update_seconds(cfg, a),
            "warmup_masks_equal": same_masks, "warmup_max_rel_weight_diff": wdiff,
            "warmup_loss_dense_masked": loss_a, "warmup_loss_sparse": loss_b,
            "epochs_s": {"dense_masked": ta, "sparse": tb}, "forward_s": {"dense_masked": fa, "sparse": fb},
        })
    return rows


def verdict(speedups: list[tuple[float, float]], what: str) -> str:
    """One line from (sparsity, speedup) pairs: faster means ≥ 1.1, slower ≤ 1/1.1."""
    speedups = sorted(speedups)
    faster = [sp for sp, s in speedups if s >= 1.1]
    slower = [sp for sp, s in speedups if s <= 1 / 1.1]
    pct = lambda xs: ", ".join(f"{100 * x:g} %" for x in xs)  # noqa: E731
    if not faster:
        return f"{what}: sparse is never faster here" + (f" (slower at {pct(slower)})" if slower else " (even at best)")
    if len(faster) == len(speedups):
        return f"{what}: sparse is faster at every sparsity measured ({pct(faster)})"
    tail = [sp for sp, _ in speedups][-len(faster):]
    head = f"faster from {100 * faster[0]:g} % sparsity on" if faster == tail else f"faster at {pct(faster)}"
    return f"{what}: sparse is {head}" + (f", slower at {pct(slower)}" if slower else "")


def parse(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--in-features", type=int, default=784)
    ap.add_argument("--hidden", type=int, nargs="+", default=[4096, 4096])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=100, help="iterations per epoch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.98, 0.995])
    ap.add_argument("--drop-fraction", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: 256-wide, 5 iterations, 1 repeat")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    ns = ap.parse_args(argv)
    cfg = Config(ns.in_features, ns.hidden, ns.classes, ns.batch, ns.iters, ns.repeats, ns.sparsities,
                 ns.drop_fraction, seed=ns.seed, threads=ns.threads)
    if ns.quick:
        cfg.hidden, cfg.iters, cfg.repeats = [256, 256], 5, 1
    return cfg, ns


def main(argv: list[str] | None = None) -> list[dict]:
    cfg, ns = parse(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = make_data(cfg)
    rows = measure(cfg, data)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 160))  # the table is wide; don't wrap it in a log
    console.print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")
    console.print(f"config: {json.dumps(asdict(cfg))}")
    console.print(f"MLP {' → '.join(map(str, [cfg.in_features, *cfg.hidden, cfg.classes]))} (ReLU), sparse: all "
                  f"but the head; SGD lr {cfg.lr} momentum {cfg.momentum}; epoch = {cfg.iters} iterations of batch "
                  f"{cfg.batch} + 1 SET update (drop {cfg.drop_fraction:g} of live, regrow as many at random); "
                  f"median of {cfg.repeats} after 1 warm-up")
    table = Table("sparsity", "dense masked (s/epoch)", "sparse (s/epoch)", "speedup (dense masked / sparse)",
                  "of which mask update, dense masked / sparse (s)", "forward-only speedup",
                  title="one training epoch, dense masked (pai-flow today) against CSR sparse matmuls")
    dense = rows[0]
    table.add_row("0 % (dense, no mask)", f"{dense['dense_s']:.3f}", "—", "—", "—",
                  f"— ({dense['forward_dense_s']:.3f} s)")
    for r in rows[1:]:
        table.add_row(f"{100 * r['sparsity']:g} %", f"{r['dense_masked_s']:.3f}", f"{r['sparse_s']:.3f}",
                      f"[bold]{r['speedup']:.2f}[/bold]",
                      f"{r['mask_update_dense_masked_s']:.3f} / {r['mask_update_sparse_s']:.3f}",
                      f"{r['forward_speedup']:.2f} ({r['forward_dense_s']:.3f} / {r['forward_sparse_s']:.3f} s)")
    console.print(table)
    check = Table("sparsity", "live weights (sparse layers)", "masks equal after warm-up",
                  "max |Δw| / max |w| after warm-up", "warm-up loss dense masked / sparse",
                  "pai_core DynamicSparsity SET update (s)", title="same training, same numbers?")
    for r in rows[1:]:
        check.add_row(f"{100 * r['sparsity']:g} %", f"{r['live_weights']} of {r['sparse_layer_weights']}",
                      "yes" if r["warmup_masks_equal"] else "[red]NO[/red]", f"{r['warmup_max_rel_weight_diff']:.1e}",
                      f"{r['warmup_loss_dense_masked']:.4f} / {r['warmup_loss_sparse']:.4f}",
                      f"{r['pai_core_set_update_s']:.3f}")
    console.print(check)
    console.print(f"dense (no mask) reference: loss {dense['last_loss']:.4f} after {cfg.repeats + 1} epochs "
                  f"(random labels: ln {cfg.classes} = {math.log(cfg.classes):.2f} at chance, lower as it memorises "
                  "the repeated batches; nan or a large loss would mean the run diverged)")
    pairs = [(r["sparsity"], r["speedup"]) for r in rows[1:]]
    fwd = [(r["sparsity"], r["forward_speedup"]) for r in rows[1:]]
    console.print(f"[bold]conclusion[/bold] ({'--quick, tiny sizes, not meaningful; ' if ns.quick else ''}"
                  f"faster = speedup ≥ 1.1): {verdict(pairs, 'training')}; {verdict(fwd, 'inference forward')}.")
    if ns.json:
        ns.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                       "config": asdict(cfg), "quick": ns.quick, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
