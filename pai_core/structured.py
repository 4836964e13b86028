"""Structured (filter / neuron) pruning for chain-shaped nets, and physical removal.

Removing filter c of layer l also removes input channel c of layer l+1 (its "dependent
channel"): the mask zeroes both, so a removed filter's bias or batch-norm shift cannot leak
into the next layer. Then `physically_prune` builds the smaller dense net, whose outputs
equal the masked net's. Only chain-shaped models qualify (each Conv/Linear feeds the next
in module order); residual nets have cross-layer channel ties that this does not resolve.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from pai_core.masks import Mask
from pai_core.selection import select

LAYERS = (nn.Conv2d, nn.Linear)


def chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LAYERS)]


def _in_units(prev: nn.Module, layer: nn.Module, keep_prev: torch.Tensor) -> torch.Tensor:
    """Which inputs of `layer` survive, given the kept outputs of the layer before it."""
    if isinstance(prev, nn.Conv2d) and isinstance(layer, nn.Linear):
        return keep_prev.repeat_interleave(layer.in_features // prev.out_channels)  # flatten: c × h × w
    return keep_prev


def filter_scores(model: nn.Module, scores: dict[str, torch.Tensor], norm: str) -> dict[str, torch.Tensor]:
    """One score per output unit of every layer but the last: the l1 or l2 norm of its weights' scores."""
    out = {}
    for name, _ in chain(model)[:-1]:
        s = scores[f"{name}.weight"].abs().flatten(1)
        out[name] = s.sum(1) if norm == "l1" else s.pow(2).sum(1).sqrt()
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
                   norm: str, min_density: float = 0.0) -> Mask:
    """Keep round(n · density) of each layer's surviving filters, ranked by their score norm
    (ties to the lower index), and remove what depends on the dropped ones."""
    alive = kept_filters(model, previous)
    keep = {name: select({name: s}, {name: alive[name]}, density, "layerwise", min_density)[name]
            for name, s in filter_scores(model, scores, norm).items()}
    return {n: m & previous[n] for n, m in filter_mask(model, keep).items()}


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
