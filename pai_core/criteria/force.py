"""FORCE (de Jorge et al., ICLR 2021, "Progressive skeletonization"): connection sensitivity
recomputed round after round at the init, on the network masked so far, with pruned
connections free to come back.

Each round's saliency of weight j is |θ_j · ∂L/∂w_j| where θ is the *unmasked* init weight
and the gradient is taken on the masked network (w = m ⊙ θ). A pruned weight's gradient is
not zero, so it keeps a saliency and may re-enter the top-k: the stage ranks every weight,
not only the survivors (`revives`). Iterative SNIP is `snip` with `schedule: iterative`:
there a pruned weight scores |0 · g| and stays pruned.

Defaults follow naver/force (`iterative_pruning`): 60 rounds on the exponential schedule
(density d^(r/60), which is pai's iterative schedule), one batch per round, each round a new
batch, gradients averaged over the round's batches. The reference ranks Conv/Linear weights
globally; so does `scope: global` here. On an unmasked net (one round) it equals SNIP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from pai_core.criteria.registry import NoParams, register

FORCE_ROUNDS = 60  # naver/force README: --num_steps 60 --mode exp


class ForceParams(NoParams):  # frozen, unknown fields refused
    batches: int = Field(1, gt=0, le=100_000, description="training batches averaged per round (a new batch each round)")


@register("force", params=ForceParams, needs_data=True, bn_mode="eval", revives=True,
          description="de Jorge et al. 2021: iterative |θ·g| on the masked net at init, pruned weights may return")
def force(model, mask, inputs, params: ForceParams) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    weights = [named[n] for n in mask]
    grads = [torch.zeros_like(w) for w in weights]
    seen = 0
    for _, (x, y) in zip(range(params.batches), inputs.batches):
        for acc, g in zip(grads, torch.autograd.grad(F.cross_entropy(model(x), y), weights)):
            acc += g
        seen += 1
    dense = inputs.dense_weights or {n: w for n, w in zip(mask, weights)}
    return {n: (g / max(seen, 1) * dense[n].to(g.device)).abs().detach() for n, g in zip(mask, grads)}
