"""Optimal Brain Damage (LeCun et al. 1990): saliency ½·H_ii·w², the second-order change of the
loss when a weight is removed from a trained net (gradient ≈ 0 at a minimum).

The Hessian diagonal is estimated with Hutchinson's estimator, diag(H) ≈ E_z[z ⊙ Hz] with
Rademacher z, Hz by double backpropagation (exact in expectation, no Gauss-Newton or Fisher
approximation), averaged over `samples` draws on each of `batches` training batches. The
draws come from the score stage's seeded generator, so the scores are reproducible. A
negative diagonal estimate (noise, or a saddle direction) gives a negative saliency: the
weight ranks as cheapest to remove, as OBD's formula says.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from pai_core.criteria.registry import NoParams, register


class OBDParams(NoParams):  # frozen, unknown fields refused
    batches: int = Field(4, gt=0, le=10_000, description="training batches the Hessian diagonal is estimated on")
    samples: int = Field(8, gt=0, le=10_000, description="Rademacher draws per batch (Hutchinson's estimator)")


@register("obd", params=OBDParams, needs_data=True, stochastic=True, bn_mode="eval",
          description="LeCun et al. 1990: Optimal Brain Damage, ½·H_ii·w², Hessian diagonal by Hutchinson")
def obd(model, mask, inputs, params: OBDParams) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    weights = [named[n] for n in mask]
    diag = [torch.zeros_like(w) for w in weights]
    draws = 0
    for _, (x, y) in zip(range(params.batches), inputs.batches):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), weights, create_graph=True)
        for s in range(params.samples):
            zs = [(torch.randint(0, 2, w.shape, generator=inputs.generator) * 2 - 1).to(w) for w in weights]
            hz = torch.autograd.grad(grads, weights, grad_outputs=zs, retain_graph=s < params.samples - 1)
            for acc, z, h in zip(diag, zs, hz):
                acc += z * h
            draws += 1
    return {n: (0.5 * d / max(draws, 1) * w.square()).detach() for n, d, w in zip(mask, diag, weights)}
