"""Network slimming (Liu et al., ICCV 2017): a channel's importance is the |γ| of the BatchNorm
that scales it, trained sparse by an L1 penalty on γ (`train.bn_l1`).

One score per output channel, given to every weight of that channel's filter (and its bias,
if pruned), so `structure: filter` with `filter_norm: max` ranks channels by exactly |γ|
(a norm would multiply |γ| by the filter's size) and `scope: global` is the paper's single
threshold over all BN scales. Only channels a BatchNorm follows are slimming's candidates
(PaT's `filter_layers` defaults to batch_norm for this criterion); the weights of a layer
with no BatchNorm after it score above every channel (1 + max |γ|), so that no ranking
prunes them before a BN channel. Reads no data: scoring is instant.
"""
from __future__ import annotations

import torch

from pai_core import structured
from pai_core.criteria.registry import register


@register("bn_scale", whole_units=True, description="Liu et al. 2017: network slimming, a channel's BatchNorm |γ| "
                                  "(structure filter; train with train.bn_l1)")
def bn_scale(model, mask, inputs, params) -> dict[str, torch.Tensor]:
    modules, named = dict(model.named_modules()), dict(model.named_parameters())
    gamma = {layer: modules[bn].weight.detach().abs() for layer, bn in structured.bn_after(model).items()}
    above = 1 + max((float(g.max()) for g in gamma.values() if g.numel()), default=0.0)
    out = {}
    for name in mask:
        p = named[name]
        g = gamma.get(name.rpartition(".")[0])
        out[name] = (torch.full_like(p, above) if g is None
                     else g.reshape(-1, *[1] * (p.dim() - 1)).expand_as(p).clone()).detach()
    return out
