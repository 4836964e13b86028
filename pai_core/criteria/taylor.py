"""Taylor first-order importance (Molchanov et al., CVPR 2019): the squared first-order
change of the loss when a weight is removed, (g·w)², averaged over training batches.

Each batch contributes (g_b ⊙ w)² with g_b that batch's gradient (the square is taken per
batch, then averaged, as the paper accumulates it over minibatches), so a weight whose
gradient flips sign from batch to batch still scores high. Whole filters: PaT's
`structure: filter` combines these per-weight scores with `filter_norm: l1` (the reference's
"Taylor_weight"); the paper's group criterion, one square per filter, is `taylor_filter`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from pai_core.criteria.registry import NoParams, register


class TaylorParams(NoParams):  # frozen, unknown fields refused
    batches: int = Field(10, gt=0, le=100_000, description="training batches whose (g·w)² are averaged")


@register("taylor", params=TaylorParams, needs_data=True, bn_mode="eval",
          description="Molchanov et al. 2019: first-order Taylor importance (g·w)², averaged over batches")
def taylor(model, mask, inputs, params: TaylorParams) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    weights = [named[n] for n in mask]
    total = [torch.zeros_like(w) for w in weights]
    seen = 0
    for _, (x, y) in zip(range(params.batches), inputs.batches):
        for acc, g, w in zip(total, torch.autograd.grad(F.cross_entropy(model(x), y), weights), weights):
            acc += (g * w).square()
        seen += 1
    return {n: (t / max(seen, 1)).detach() for n, t in zip(mask, total)}
