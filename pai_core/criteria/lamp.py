"""LAMP, layer-adaptive magnitude pruning (Lee et al., ICLR 2021): a magnitude score rescaled so
that one global ranking gives each layer its own, distortion-aware sparsity.

Within a layer, with the surviving weights sorted by w² ascending, weight u scores
w_u² / Σ_{v ≥ u} w_v², its square over the sum of its own and every larger square. The order
within a layer is magnitude's, so a layer keeps its largest weights; what changes is how many.
The largest weight of every layer scores exactly 1, so no layer is ever emptied. The paper shows
that pruning the lowest score minimises a bound on the output distortion of the whole net, and
that global magnitude, uniform and ERK allocations fall behind it at high sparsity.

As jaeho-lee/layer-adaptive-sparsity: scores are of the masked weights (a pruned weight is 0, so
it scores 0), and equal magnitudes are ordered by position (a stable sort), so the score is
deterministic. Scores are float64: cast to float32, the scores of different layers would tie.
Meant for `scope: global`; with `layerwise` it is magnitude pruning, since the order within each
layer is the same.
"""
from __future__ import annotations

import torch

from pai_core.criteria.registry import register


@register("lamp", description="Lee et al. 2021: w² over the sum of the layer's larger w², ranked globally "
                              "(layer-adaptive magnitude)")
def lamp(model, mask, inputs, params) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    return {n: lamp_scores(named[n].detach()) for n in mask}


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """Each entry's w² / Σ of the w² at or above it in the layer's ascending, stable order (float64)."""
    sq = weight.double().square().flatten()
    order = torch.sort(sq, stable=True).indices
    ranked = sq[order]
    tail = ranked.flip(0).cumsum(0).flip(0)  # Σ_{v ≥ u} w_v² in sorted position
    score = torch.where(tail > 0, ranked / tail.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    out = torch.empty_like(sq)
    out[order] = score
    return out.reshape(weight.shape)
