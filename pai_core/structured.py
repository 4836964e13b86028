"""Structured (filter / neuron) pruning for chain-shaped nets, and physical removal.

Removing filter c of layer l also removes input channel c of layer l+1 (its "dependent
channel"): the mask zeroes both, so a removed filter's bias or batch-norm shift cannot leak
into the next layer. Then `physically_prune` builds the smaller dense net, whose outputs
equal the masked net's. Only chain-shaped models qualify (each Conv/Linear feeds the next
in module order); residual nets have cross-layer channel ties that this does not resolve.

Which filters go: each layer keeps the same fraction (`layerwise`, Li et al. 2017), or one
ranking over the filters of all layers keeps the best (`global`: network slimming's single
threshold over every BN scale, Molchanov et al.'s global Taylor ranking). `layers="batch_norm"`
restricts pruning to the layers whose outputs a BatchNorm carries (slimming's channels); the
others keep every unit. The BatchNorm helpers slimming and early-bird share live here too.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from pai_core.masks import Mask
from pai_core.selection import select

LAYERS = (nn.Conv2d, nn.Linear)
BN = (nn.BatchNorm1d, nn.BatchNorm2d)
NORMS = ("l1", "l2", "max")  # how a filter's per-weight scores combine into one
UNIT_LAYERS = ("all", "batch_norm")  # which layers lose units: every one but the output, or those with BN


def chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LAYERS)]


def bn_after(model: nn.Module) -> dict[str, str]:
    """Chain layer -> the affine BatchNorm that normalizes its output units (the first one
    between it and the next Conv/Linear in module order, of matching width): the channel a
    BN scale γ_c gates is that layer's filter c."""
    out: dict[str, str] = {}
    last: tuple[str, nn.Module] | None = None
    for name, m in model.named_modules():
        if isinstance(m, LAYERS):
            last = (name, m)
        elif (isinstance(m, BN) and m.affine and last is not None and last[0] not in out
              and m.num_features == _out_units(last[1])):
            out[last[0]] = name
    return out


@torch.no_grad()
def bn_l1_subgradient(model: nn.Module, lam: float) -> None:
    """Network slimming's sparsity term (Liu et al. 2017, the reference `updateBN`): after
    backward, add λ·sign(γ) to the gradient of every BatchNorm scale, the subgradient of
    λ·Σ|γ|. A scale at exactly 0 gets none (sign(0) = 0), as in the reference."""
    for m in model.modules():
        if isinstance(m, BN) and m.weight is not None and m.weight.grad is not None:
            m.weight.grad.add_(lam * torch.sign(m.weight.detach()))


def unit_layers(model: nn.Module, layers: str = "all") -> list[tuple[str, nn.Module]]:
    """The layers whose output units (filters/neurons) filter pruning may remove: every chain
    layer but the output (`all`), or only those a BatchNorm follows (`batch_norm`)."""
    candidates = chain(model)[:-1]
    if layers == "batch_norm":
        with_bn = bn_after(model)
        return [(n, m) for n, m in candidates if n in with_bn]
    return candidates


def _in_units(prev: nn.Module, layer: nn.Module, keep_prev: torch.Tensor) -> torch.Tensor:
    """Which inputs of `layer` survive, given the kept outputs of the layer before it."""
    if isinstance(prev, nn.Conv2d) and isinstance(layer, nn.Linear):
        return keep_prev.repeat_interleave(layer.in_features // prev.out_channels)  # flatten: c × h × w
    return keep_prev


def filter_scores(model: nn.Module, scores: dict[str, torch.Tensor], norm: str,
                  layers: str = "all") -> dict[str, torch.Tensor]:
    """One score per output unit of each candidate layer: the l1 or l2 norm of its weights'
    scores, or their max. `max` is for criteria that give every weight of a unit the unit's
    own score (bn_scale's |γ|, taylor_filter): it returns that score exactly, where a norm
    would multiply it by the filter's size and favour wide filters."""
    if norm not in NORMS:
        raise ValueError(f"filter norm {norm!r}; allowed: {', '.join(NORMS)}")
    out = {}
    for name, _ in unit_layers(model, layers):
        s = scores[f"{name}.weight"].abs().flatten(1)
        out[name] = s.sum(1) if norm == "l1" else s.pow(2).sum(1).sqrt() if norm == "l2" else s.amax(1)
    return out


def filter_mask(model: nn.Module, keep: dict[str, torch.Tensor]) -> Mask:
    """Weight masks that remove the dropped filters and their dependent input channels."""
    layers = chain(model)
    mask = {f"{n}.weight": torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers}
    for (name, layer), (nxt_name, nxt) in zip(layers, layers[1:]):
        k = keep[name].bool()
        mask[f"{name}.weight"][~k] = False
        mask[f"{nxt_name}.weight"][:, ~_in_units(layer, nxt, k)] = False
    return mask


def select_filters(model: nn.Module, scores: dict[str, torch.Tensor], previous: Mask, density: float,
                   norm: str, min_density: float = 0.0, scope: str = "layerwise", layers: str = "all",
                   invert: bool = False) -> Mask:
    """Keep the best surviving filters of the candidate layers (`unit_layers`), ranked by
    `filter_scores` (ties to the lower index), and remove what depends on the dropped ones.

    `layerwise`: round(n · density) of each layer's n filters. `global`: round(N · density) of
    all N candidate filters by one ranking, each layer first keeping its best ceil(min_density · n)
    and at least 1 surviving filter: a global threshold may otherwise empty a layer (the
    slimming reference then builds a 0-channel conv), and the spec check refuses only
    schedules that keep fewer filters than layers. Layers that are not candidates keep theirs.
    `invert` (sanity checks) keeps the lowest-ranked filters instead: it negates the filter
    scores, after the norm (negating the weights' scores would change nothing under it)."""
    alive = kept_filters(model, previous)
    unit = filter_scores(model, scores, norm, layers)
    if invert:
        unit = {n: -v for n, v in unit.items()}
    if scope == "global":
        keep = _global_keep(unit, {n: alive[n] for n in unit}, density, min_density)
    elif scope == "layerwise":
        keep = {name: select({name: s}, {name: alive[name]}, density, "layerwise", min_density)[name]
                for name, s in unit.items()}
    else:
        raise ValueError(f"filter scope {scope!r}; allowed: layerwise, global")
    return {n: m & previous[n] for n, m in filter_mask(model, alive | keep).items()}


def _global_keep(unit: dict[str, torch.Tensor], alive: dict[str, torch.Tensor], density: float,
                 min_density: float) -> dict[str, torch.Tensor]:
    """One ranking over the units of every layer, after each layer's floor (see select_filters)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    names = list(unit)
    if not names:
        return {}
    floors = [_top(unit[n], alive[n], min(max(1, math.ceil(min_density * len(unit[n]))), int(alive[n].sum())))
              for n in names]
    rest = round(sum(len(unit[n]) for n in names) * density) - sum(int(f.sum()) for f in floors)
    extra = _top(torch.cat([unit[n] for n in names]), torch.cat([alive[n] & ~f for n, f in zip(names, floors)]), rest)
    return {n: f | e for n, f, e in zip(names, floors, torch.split(extra, [len(unit[n]) for n in names]))}


def _top(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k best alive entries (stable sort: ties keep the lower index)."""
    keep = torch.zeros_like(alive, dtype=torch.bool)
    idx = alive.nonzero().squeeze(1)
    if k > 0 and idx.numel():
        if not torch.isfinite(scores[idx]).all():
            raise ValueError("filter scores contain NaN or inf")
        keep[idx[torch.sort(scores[idx].double(), descending=True, stable=True).indices[:k]]] = True
    return keep


def costs(model: nn.Module, mask: Mask, in_shape: tuple[int, ...]) -> dict[str, Any]:
    """Real counts: the dense net, and the physically smaller one this mask makes."""
    return {"dense": cost(model, in_shape), "pruned": cost(physically_prune(model, mask), in_shape)}


def kept_filters(model: nn.Module, mask: Mask) -> dict[str, torch.Tensor]:
    return {n: mask[f"{n}.weight"].flatten(1).any(1) for n, _ in chain(model)[:-1]}


@torch.no_grad()
def physically_prune(model: nn.Module, mask: Mask) -> nn.Module:
    """A smaller dense copy without the removed filters, channels and norm-layer entries."""
    new = copy.deepcopy(model)
    layers = chain(new)
    keep = kept_filters(new, mask)
    keep[layers[-1][0]] = torch.ones(_out_units(layers[-1][1]), dtype=torch.bool)
    modules = dict(new.named_modules())
    names = list(modules)
    for i, (name, layer) in enumerate(layers):
        out_k = keep[name]
        in_k = (torch.ones(_in_units_count(layer), dtype=torch.bool) if i == 0
                else _in_units(layers[i - 1][1], layer, keep[layers[i - 1][0]]))
        w = (layer.weight * mask[f"{name}.weight"].to(layer.weight.dtype))[out_k][:, in_k]
        if isinstance(layer, nn.Conv2d):
            small = nn.Conv2d(int(in_k.sum()), int(out_k.sum()), layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, bias=layer.bias is not None)
        else:
            small = nn.Linear(int(in_k.sum()), int(out_k.sum()), bias=layer.bias is not None)
        small.weight.copy_(w)
        if layer.bias is not None:
            small.bias.copy_(layer.bias[out_k])
        _replace(new, name, small)
        # Norm layers between this layer and the next carry this layer's channels.
        end = names.index(layers[i + 1][0]) if i + 1 < len(layers) else len(names)
        for between in names[names.index(name) + 1:end]:
            if isinstance(modules[between], nn.BatchNorm2d):
                _replace(new, between, _slice_bn(modules[between], out_k))
    return new


def _out_units(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def _in_units_count(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def _slice_bn(bn: nn.BatchNorm2d, k: torch.Tensor) -> nn.BatchNorm2d:
    small = nn.BatchNorm2d(int(k.sum()), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    small.load_state_dict({n: (t[k] if t.dim() else t) for n, t in bn.state_dict().items()})
    return small


def _replace(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def cost(model: nn.Module, in_shape: tuple[int, ...], mask: Mask | None = None) -> dict[str, Any]:
    """Parameters and FLOPs (2 per multiply-add) of Conv/Linear layers, counting only kept
    weights when a mask is given; plus all parameters of the module as it is."""
    flops, weights = 0, 0
    sizes: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: sizes.__setitem__(n, o[0, 0].numel()))
             for n, m in chain(model)]
    was = model.training
    model.eval()
    model(torch.zeros((1, *in_shape), device=next(model.parameters()).device))
    model.train(was)
    for h in hooks:
        h.remove()
    for n, m in chain(model):
        kept = int(mask[f"{n}.weight"].sum()) if mask and f"{n}.weight" in mask else m.weight.numel()
        weights += kept
        flops += 2 * kept * (sizes[n] if isinstance(m, nn.Conv2d) else 1)
    return {"weights": weights, "flops": flops, "parameters": sum(p.numel() for p in model.parameters())}
