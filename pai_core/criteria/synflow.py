"""SynFlow (Tanaka et al. 2020): data-free iterative synaptic flow.

On a copy of the net with every parameter replaced by its absolute value, in float64 and
with batch norm in eval mode, the all-ones input gives R = Σ outputs; the score is
|θ ⊙ ∂R/∂θ|. The copy is thrown away, so the caller's weights (and signs) are untouched.
Float64 matters: products of many small weights underflow in float32 on deep nets. The
100-round exponential schedule is the pruning schedule around this score, not part of it.
"""
from __future__ import annotations

import copy

import torch

from pai_core.criteria.registry import register


@register("synflow", bn_mode="eval",  # Synaptic-Flow prunes in eval mode by default
          description="Tanaka et al. 2020: data-free synaptic flow |∂R/∂w ⊙ w| of the |w| net, float64")
def synflow(model, mask, inputs, params) -> dict[str, torch.Tensor]:
    net = copy.deepcopy(model).double()  # keeps the mode the score stage set (bn_mode)
    with torch.no_grad():
        for p in net.parameters():
            p.abs_()
    named = dict(net.named_parameters())
    weights = [named[n] for n in mask]
    x = torch.ones((1, *inputs.in_shape), dtype=torch.float64, device=weights[0].device)
    grads = torch.autograd.grad(net(x).sum(), weights)
    return {n: (w * g).detach().abs() for n, w, g in zip(mask, weights, grads)}
