"""GraSP (Wang et al. 2020): preserve gradient flow. Its score is −θ ⊙ Hg, with g the
gradient of the loss on temperature-scaled logits and H the Hessian, and GraSP removes the
*largest* scores. In pai-flow's higher = keep convention the score is therefore θ ⊙ Hg.

Hg comes from double backprop: z = gᵀ∇L(θ) with g held constant, Hg = ∂z/∂θ. The data is
a class-balanced sample of `samples_per_class` examples per class from the first batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from pai_core.criteria.registry import register


class GraspParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    samples_per_class: int = Field(10, gt=0)
    temperature: float = Field(200.0, gt=0, description="logits are divided by it")


def balanced_sample(batches, num_classes: int, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `per_class` examples of every class, in data order."""
    xs, ys, counts = [], [], [0] * num_classes
    for x, y in batches:
        for i, label in enumerate(y.tolist()):
            if counts[label] < per_class:
                counts[label] += 1
                xs.append(x[i])
                ys.append(y[i])
        if min(counts) >= per_class:
            break
    return torch.stack(xs), torch.stack(ys)


@register("grasp", params=GraspParams, needs_data=True, bn_mode="train",  # the authors' code never calls eval()
          description="Wang et al. 2020: keep θ ⊙ Hg (gradient-flow preservation), tempered logits")
def grasp(model, mask, inputs, params: GraspParams) -> dict[str, torch.Tensor]:
    x, y = balanced_sample(inputs.batches, inputs.num_classes, params.samples_per_class)
    named = dict(model.named_parameters())
    weights = [named[n] for n in mask]

    def loss():
        return F.cross_entropy(model(x) / params.temperature, y)

    g = torch.autograd.grad(loss(), weights)
    grads = torch.autograd.grad(loss(), weights, create_graph=True)
    z = sum((gi.detach() * gr).sum() for gi, gr in zip(g, grads))
    hg = torch.autograd.grad(z, weights)
    return {n: (w * h).detach() for n, w, h in zip(mask, weights, hg)}
