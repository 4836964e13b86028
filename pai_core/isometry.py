"""Approximate dynamical isometry for a sparse net (Lee et al., ICLR 2020, "A signal
propagation perspective for pruning neural networks at initialization").

A mask chosen at init breaks the orthogonality an initialisation was chosen for, so the
signal shrinks or explodes through the sparse layers. The paper re-initialises the kept
weights by minimising, for every layer, ||(M⊙W)(M⊙W)ᵀ − I||_F (W as out × fan-in) with
gradient steps on the kept weights only. namhoonlee/spp-public: the Frobenius norm (not
squared), summed over layers, plain SGD at lr 0.1 for 10,000 steps, from the masked init.

The layers do not interact, so each is optimised on its own with the closed-form gradient
2·(G − I)·W / ||G − I||_F (G = WWᵀ is symmetric), masked. A layer with more outputs than
fan-in cannot reach WWᵀ = I (its rank is at most the fan-in); the loss is still minimised.
"""
from __future__ import annotations

import warnings

import torch

from pai_core.masks import Mask

ISOMETRY_LR, ISOMETRY_STEPS = 0.1, 10_000  # spp-public: prepare_optimization('sgd', 0.1), range(10000)


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Singular values of a weight as the layer's linear map (out × fan-in): for a linear layer
    its input-output Jacobian, for a conv layer that of one output position."""
    return torch.linalg.svdvals(w.detach().double().reshape(w.shape[0], -1))


def spread(w: torch.Tensor) -> dict[str, float]:
    sv = singular_values(w)
    return {"min": float(sv.min()), "max": float(sv.max()), "mean": float(sv.mean())}


SPARSE_BELOW = 0.25  # kept fraction under which the sparse products are faster (measured here: 2.6× at 10 %)


@torch.no_grad()
def orthogonalize(w: torch.Tensor, mask: torch.Tensor, steps: int = ISOMETRY_STEPS,
                  lr: float = ISOMETRY_LR) -> torch.Tensor:
    """The kept weights of one layer moved towards (M⊙W)(M⊙W)ᵀ = I; pruned entries stay 0.
    A sparse layer is stepped on its kept values alone (CSR products: the same numbers, 10×
    fewer operations at 98 % sparsity); a dense one with dense products."""
    m = mask.reshape(w.shape[0], -1).to(w.device).bool()
    x = w.reshape(w.shape[0], -1).to(torch.float32) * m
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    if m.float().mean() >= SPARSE_BELOW or x.device.type != "cpu":
        mf = m.to(x.dtype)
        for _ in range(steps):
            residual = x @ x.T - eye
            norm = torch.linalg.matrix_norm(residual)
            if norm == 0:
                break
            x -= lr * (2 * (residual @ x) / norm) * mf
        return x.reshape(w.shape).to(w.dtype)
    rows, cols = m.nonzero(as_tuple=True)  # row-major: the CSR order of x
    with warnings.catch_warnings():  # torch flags CSR as beta; the products used here are plain
        warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
        values = _sparse_steps(x[rows, cols].clone(), rows, cols, tuple(m.shape), eye, steps, lr)
    out = torch.zeros_like(x)
    out[rows, cols] = values
    return out.reshape(w.shape).to(w.dtype)


def _crow(index: torch.Tensor, n: int) -> torch.Tensor:
    """CSR row pointers of sorted row indices."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(torch.bincount(index, minlength=n), 0)])


def _sparse_steps(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int],
                  eye: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """The dense loop's steps on the kept values (in row-major order) of x, with x and xᵀ in CSR."""
    out_n, in_n = shape
    by_col = torch.argsort(cols * out_n + rows)  # the CSR order of xᵀ
    crow, crow_t, col_t = _crow(rows, out_n), _crow(cols[by_col], in_n), rows[by_col]
    for _ in range(steps):
        xt = torch.sparse_csr_tensor(crow_t, col_t, values[by_col], (in_n, out_n))
        residual = torch.sparse.mm(torch.sparse_csr_tensor(crow, cols, values, shape), xt.to_dense()) - eye
        norm = torch.linalg.matrix_norm(residual)
        if norm == 0:
            break
        grad_t = torch.sparse.mm(xt, residual)  # xᵀ·R = (R·x)ᵀ, R symmetric
        values -= lr * 2 * grad_t[cols, rows] / norm
    return values


def approximate_isometry(weights: dict[str, torch.Tensor], mask: Mask, steps: int = ISOMETRY_STEPS,
                         lr: float = ISOMETRY_LR) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """New values for every masked weight (≥ 2-D; biases are left as they are), and per
    layer the singular-value spread before and after."""
    out, report = {}, {}
    for name, m in mask.items():
        w = weights[name]
        if w.dim() < 2:
            continue
        before = spread(w * m.to(w.device))
        out[name] = orthogonalize(w, m, steps, lr)
        report[name] = {"before": before, "after": spread(out[name])}
    return out, report
