"""SNIP (Lee et al. 2019): connection sensitivity |∂L/∂c| at c = 1, which is |g ⊙ w|.

Gradients are summed over the first `batches` training batches (a constant factor does
not change the ranking). On an already-masked net (iterative SNIP) the gradient is that of
the masked net, as the sensitivity of the current connections should be.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from pai_core.criteria.registry import register


class SnipParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    batches: int = Field(1, gt=0, description="training batches whose gradients are summed")


@register("snip", params=SnipParams, needs_data=True, bn_mode="eval",  # snip-public: is_train defaults False
          description="Lee et al. 2019: connection sensitivity |g ⊙ w| on training batches")
def snip(model, mask, inputs, params: SnipParams) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    weights = [named[n] for n in mask]
    grads = [torch.zeros_like(w) for w in weights]
    for _, (x, y) in zip(range(params.batches), inputs.batches):
        for acc, g in zip(grads, torch.autograd.grad(F.cross_entropy(model(x), y), weights)):
            acc += g
    return {n: (g * w).abs().detach() for n, g, w in zip(mask, grads, weights)}
