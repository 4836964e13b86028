"""First-order Taylor importance of whole filters/neurons (Molchanov et al., CVPR 2019): the
squared first-order change of the loss when a unit is removed, (Σ_{s∈unit} g_s·w_s)², each
batch's value squared, then averaged over batches (as the paper and its reference
`pruning_engine.py` accumulate it over minibatches; no per-layer normalization, so one
global ranking over all layers is meaningful).

`form` (a param):
- `gate` (default; the paper's recommendation for BN nets, "gate after BN", the reference's
  method 22 / 31): a unit's score is (∂L/∂z)² for a gate z = 1 multiplying its output. Where a
  BatchNorm follows the layer that is after the BN: (γ·∂L/∂γ + β·∂L/∂β)²; elsewhere on the
  layer's output itself: (Σ_s g_s·w_s + g_b·b)², its weights and its bias.
- `weight`: Eq. 8 over the filter's weights only, (Σ_{s∈filter} g_s·w_s)². Behind a
  BatchNorm in train mode this is ≈ 0 (the normalization makes the loss invariant to the
  filter's scale), which is why the paper gates after BN; score it with `prune.bn_mode: eval`.

The reference's own "Taylor_weight" (method 0) sums per-weight squares, Σ_s (g_s·w_s)²: that
is the per-weight `taylor` criterion with `filter_norm: l1`. Scores are taken in BatchNorm
train mode: the paper accumulates them during (fine-)training. One score per unit, given to
every weight of the unit (and its bias, if pruned), so `structure: filter` reads it exactly
with `filter_norm: max`.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pai_core import structured
from pai_core.criteria.registry import NoParams, register


class TaylorFilterParams(NoParams):  # frozen, unknown fields refused
    batches: int = Field(10, gt=0, le=100_000, description="training batches whose squared unit contributions "
                                                           "are averaged")
    form: Literal["gate", "weight"] = Field(
        "gate", description="gate: (∂L/∂gate)² of a gate after the unit's BatchNorm, (γ·∂L/∂γ + β·∂L/∂β)², or "
                            "after the layer where none follows (the paper's pick for BN nets); weight: "
                            "(Σ g·w)² over the filter's weights")


@register("taylor_filter", whole_units=True, params=TaylorFilterParams, needs_data=True, bn_mode="train",
          description="Molchanov et al. 2019: Taylor importance of whole filters, (Σ g·w)² of a unit "
                      "(gate after BN by default), averaged over batches")
def taylor_filter(model, mask, inputs, params: TaylorFilterParams) -> dict[str, torch.Tensor]:
    modules, named = dict(model.named_modules()), dict(model.named_parameters())
    layers = list(dict.fromkeys(n.rpartition(".")[0] for n in mask))
    bn = structured.bn_after(model) if params.form == "gate" else {}
    terms = {layer: unit_terms(modules[layer], modules[bn[layer]] if layer in bn else None, params.form)
             for layer in layers}
    flat = [t for ts in terms.values() for t in ts]
    total = {layer: torch.zeros(ts[0].shape[0], dtype=torch.float64, device=ts[0].device)
             for layer, ts in terms.items()}
    seen = 0
    for _, (x, y) in zip(range(params.batches), inputs.batches):
        grads = iter(torch.autograd.grad(F.cross_entropy(model(x), y), flat))
        for layer, ts in terms.items():
            total[layer] += sum((next(grads) * t).reshape(t.shape[0], -1).sum(1) for t in ts).double().square()
        seen += 1
    out = {}
    for name in mask:
        p = named[name]
        unit = (total[name.rpartition(".")[0]] / max(seen, 1)).to(p.dtype)
        out[name] = unit.reshape(-1, *[1] * (p.dim() - 1)).expand_as(p).clone().detach()
    return out


def unit_terms(layer: nn.Module, bn: nn.Module | None, form: str) -> list[torch.Tensor]:
    """The parameters t whose Σ t·∂L/∂t over each output unit is that unit's first-order term."""
    if form == "weight":
        return [layer.weight]
    if bn is not None:  # the gate after the BN: γ x̂ + β scaled by z
        return [bn.weight, bn.bias]
    return [layer.weight] + ([layer.bias] if layer.bias is not None else [])
