"""Linear interpolation between two trained networks: Frankle et al. (ICML 2020)'s instability
analysis ("Linear mode connectivity and the lottery ticket hypothesis").

Two copies of one network are trained from the same weights w_k under different SGD noise
(data order, augmentation, dropout). They are *stable* when the error on the straight line
between their final weights does not rise above their own; the instability is the error
barrier, max_α err((1 − α)·w_A + α·w_B) − mean(err(w_A), err(w_B)), the supremum taken on a
grid of α. A mask shared by both copies stays applied all along the path (pruned weights are
zero at both ends, so at every α).

BatchNorm running statistics are interpolated with the weights by default (`interpolate`), as
a plain linear path does. `recompute` resets them at each α and re-estimates them from training
batches (a cumulative average, momentum None): the mean and variance of interpolated weights'
activations are not the interpolated means and variances, and a barrier that vanishes with
recomputed statistics is a statistics artefact, not a ridge in the loss (Jordan et al. 2023).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from pai_core.masks import Mask, apply_mask

BN_STATS = ("interpolate", "recompute")


def alphas(n: int) -> list[float]:
    """n evenly spaced points of [0, 1], both ends included (n ≥ 2)."""
    if n < 2:
        raise ValueError(f"instability.alphas: {n} points cannot hold both ends of the path; allowed: 2 or more")
    return [i / (n - 1) for i in range(n)]


def interpolate_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """(1 − α)·a + α·b for every floating tensor, exactly a at α = 0 and exactly b at α = 1
    (torch.lerp switches its formula at 0.5, so neither end carries rounding). Integer
    buffers (BatchNorm's batch counters) come from the nearer end."""
    if a.keys() != b.keys():
        raise ValueError(f"the two networks differ in their tensors: {sorted(set(a) ^ set(b))[:5]}")
    out = {}
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape:
            raise ValueError(f"{name}: shapes {tuple(x.shape)} and {tuple(y.shape)} cannot be interpolated")
        out[name] = torch.lerp(x, y.to(x.dtype), alpha) if x.is_floating_point() else (x if alpha < 0.5 else y).clone()
    return out


@torch.no_grad()
def recompute_bn(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as the plain average over
    `batches` (train-mode forwards, no gradient). Returns how many batches it used; the model's
    mode and each layer's momentum are restored."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    used = 0
    for x, _ in batches:
        model(x)
        used += 1
    for m, mom in zip(norms, momenta):
        m.momentum = mom
    model.train(was_training)
    return used


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def barrier(values: list[float]) -> float:
    """The rise of a path's curve above the mean of its two ends (Frankle et al.'s instability
    when `values` are errors). Never negative: the ends themselves are on the path."""
    return max(values) - (values[0] + values[-1]) / 2


def path(model: nn.Module, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], points: list[float],
         measure: Callable[[nn.Module], dict[str, float]], *, mask: Mask | None = None, bn_stats: str = "interpolate",
         bn_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None) -> list[dict[str, float]]:
    """`measure(model)` at each α of `points`, the model holding the interpolated weights (masked by
    `mask`); each row is {"alpha": α, **measure}. `bn_stats: recompute` needs `bn_batches`, a
    callable giving the same training batches for every α."""
    if bn_stats not in BN_STATS:
        raise ValueError(f"instability.bn_stats: {bn_stats!r}; allowed: {', '.join(BN_STATS)}")
    recompute = bn_stats == "recompute" and has_batch_norm(model)
    if recompute and bn_batches is None:
        raise ValueError("bn_stats: recompute needs training batches to re-estimate the statistics")
    rows = []
    for alpha in points:
        model.load_state_dict(interpolate_state(a, b, alpha))
        if mask is not None:
            apply_mask(model, mask)
        if recompute:
            recompute_bn(model, bn_batches())
        rows.append({"alpha": alpha, **measure(model)})
    return rows
