"""Structured (filter / neuron) pruning, and physical removal, for any net channel_graph traces.

Removing filter c of a layer also removes every input channel it feeds, and every channel tied
to it by a residual add (channel_graph's groups): the mask zeroes all of them, so a removed
filter's bias or batch-norm shift cannot leak into a later layer. Then `physically_prune` builds
the smaller dense net, whose outputs equal the masked net's. A chain net's groups are its
layers' filters, one each, as before the graph existed.

Which groups go: each family keeps the same fraction (`layerwise`, Li et al. 2017), or one
ranking over the groups of all families keeps the best (`global`: network slimming's single
threshold over every BN scale, Molchanov et al.'s global Taylor ranking). `layers="batch_norm"`
restricts pruning to the groups whose outputs BatchNorms carry (slimming's channels),
`layers="unshared"` to those one layer makes alone (Li et al.'s ResNets keep the residual
stream); the others keep every unit. The BatchNorm helpers slimming and early-bird share live
here too.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pai_core import channel_graph, flops
from pai_core.masks import Mask, is_ignored
from pai_core.selection import density_of, select

LAYERS = flops.LAYERS  # the layers whose filters and inputs are pruned
BN = (nn.BatchNorm1d, nn.BatchNorm2d)
NORMS = ("l1", "l2", "max")  # how a filter's per-weight scores combine into one
UNIT_LAYERS = ("all", "batch_norm", "unshared")  # which groups may go: see unit_families


def chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Conv/Linear layers in module order (a chain net's, in the order they feed each other)."""
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


def unit_families(model: nn.Module, layers: str = "all", graph: channel_graph.ChannelGraph | None = None,
                  ignore: Sequence[str] = ()) -> dict[str, list[channel_graph.Group]]:
    """The channel groups filter pruning may remove, by family (channel_graph): every group not
    tied to the net's input or output (`all`); those whose every producing layer a BatchNorm
    follows (`batch_norm`, slimming's channels); or those made by one layer alone (`unshared`:
    Li et al. 2017's choice on ResNets, which leaves the residual stream whole; a depthwise conv
    after that layer does not count as a second, as its filter c is channel c itself, so
    MobileNetV2's expanded channels are unshared). A family with an ignored producer
    (`prune.ignore`) keeps its filters."""
    graph = graph or channel_graph.trace(model)
    if layers not in UNIT_LAYERS:
        raise ValueError(f"filter layers {layers!r}; allowed: {', '.join(UNIT_LAYERS)}")
    with_bn = bn_after(model) if layers == "batch_norm" else {}
    return {f: gs for f, gs in graph.families.items()
            if not any(is_ignored(f"{n}.weight", ignore) for n in gs[0].layers)
            and (layers == "all" or (layers == "unshared" and len(set(gs[0].layers) - graph.depthwise) == 1)
                 or (layers == "batch_norm" and all(n in with_bn for n in gs[0].layers)))}


def unit_layers(model: nn.Module, layers: str = "all", ignore: Sequence[str] = ()) -> list[tuple[str, int]]:
    """(family, number of groups) of the candidates: what a filter density applies to."""
    return [(f, len(gs)) for f, gs in unit_families(model, layers, ignore=ignore).items()]


def filter_scores(model: nn.Module, scores: dict[str, torch.Tensor], norm: str, layers: str = "all",
                  graph: channel_graph.ChannelGraph | None = None, ignore: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """One score per channel group of each candidate family: the l1 or l2 norm of the scores of
    its filters' weights (every producing layer's filter of the group, so a residual channel
    counts all the convs that write it), or their max. `max` is for criteria that give every
    weight of a unit the unit's own score (bn_scale's |γ|, taylor_filter): it returns that score
    exactly, where a norm would multiply it by the filter's size and favour wide filters."""
    if norm not in NORMS:
        raise ValueError(f"filter norm {norm!r}; allowed: {', '.join(NORMS)}")
    per_filter: dict[str, torch.Tensor] = {}
    out = {}
    for fam, groups in unit_families(model, layers, graph, ignore).items():
        for layer in groups[0].layers:
            if layer not in per_filter:
                s = scores[f"{layer}.weight"].abs().flatten(1)
                per_filter[layer] = (s.sum(1) if norm == "l1" else s.pow(2).sum(1) if norm == "l2" else s.amax(1))
        vals = []
        for g in groups:
            parts = torch.stack([per_filter[layer][c] for layer, c in g.producers])
            vals.append(parts.sum() if norm == "l1" else parts.sum().sqrt() if norm == "l2" else parts.amax())
        out[fam] = torch.stack(vals)
    return out


def filter_mask(model: nn.Module, keep: dict[str, torch.Tensor],
                graph: channel_graph.ChannelGraph | None = None) -> Mask:
    """Weight masks that remove the dropped groups' filters and every input channel they feed
    (`keep`: per family, as kept_filters; families not named keep all)."""
    graph = graph or channel_graph.trace(model)
    mask = {f"{n}.weight": torch.ones_like(m.weight, dtype=torch.bool) for n, m in chain(model)}
    removed = graph.removed_ids(keep)
    if not removed:
        return mask
    for name, roots in graph.out_roots.items():
        gone = torch.tensor([r in removed for r in roots])
        mask[f"{name}.weight"][gone] = False
    for name, roots in graph.in_roots.items():
        gone = torch.tensor([r in removed for r in roots]).repeat_interleave(channel_graph.in_factor(model, graph, name))
        mask[f"{name}.weight"][:, gone] = False
    return mask


def select_filters(model: nn.Module, scores: dict[str, torch.Tensor], previous: Mask, density: float,
                   norm: str, min_density: float = 0.0, scope: str = "layerwise", layers: str = "all",
                   invert: bool = False, ignore: Sequence[str] = (),
                   layer_density: dict[str, float] | None = None) -> Mask:
    """Keep the best surviving channel groups of the candidate families (`unit_families`), ranked
    by `filter_scores` (ties to the lower index), and remove what depends on the dropped ones.

    `layerwise`: round(n · density) of each family's n groups (a chain layer's filters, or one
    residual stream's channels). `global`: round(N · density) of all N candidate groups by one
    ranking, each family first keeping its best ceil(min_density · n) and at least 1 surviving
    group: a global threshold may otherwise empty a layer (the slimming reference then builds a
    0-channel conv), and the spec check refuses only schedules that keep fewer filters than
    families. Families that are not candidates keep theirs. `invert` (sanity checks) keeps the
    lowest-ranked groups instead: it negates the group scores, after the norm (negating the
    weights' scores would change nothing under it). `layer_density` (layerwise): {pattern:
    density} for the families whose first layer's weight the pattern names."""
    graph = channel_graph.trace(model)
    alive = kept_filters(model, previous, graph)
    unit = filter_scores(model, scores, norm, layers, graph, ignore)
    if invert:
        unit = {n: -v for n, v in unit.items()}
    if layer_density and scope != "layerwise":
        raise ValueError(f"per-family densities apply to scope layerwise, not {scope}")
    if scope == "global":
        keep = _global_keep(unit, {n: alive[n] for n in unit}, density, min_density)
    elif scope == "layerwise":  # a family's own density: `layer_density`'s pattern naming its first layer
        keep = {name: select({name: s}, {name: alive[name]}, density_of(f"{name}.weight", layer_density, density),
                             "layerwise", min_density)[name] for name, s in unit.items()}
    else:
        raise ValueError(f"filter scope {scope!r}; allowed: layerwise, global")
    return {n: m & previous[n] if n in previous else m for n, m in filter_mask(model, alive | keep, graph).items()}

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


def kept_filters(model: nn.Module, mask: Mask, graph: channel_graph.ChannelGraph | None = None
                 ) -> dict[str, torch.Tensor]:
    """Per family, which groups survive: those with a weight left in one of their filters."""
    graph = graph or channel_graph.trace(model)
    rows = {n: mask[f"{n}.weight"].flatten(1).any(1) if f"{n}.weight" in mask
            else torch.ones(m.weight.shape[0], dtype=torch.bool) for n, m in chain(model)}
    return {fam: torch.stack([torch.stack([rows[n][c] for n, c in g.producers]).any() for g in groups])
            for fam, groups in graph.families.items()}


@torch.no_grad()
def physically_prune(model: nn.Module, mask: Mask) -> nn.Module:
    """A smaller dense copy without the removed groups' filters, input channels, BatchNorm
    entries and padded channels. A net whose channels move through an F.pad (He et al.'s
    option-A shortcut) comes back as an fx.GraphModule, its pads shortened to the kept
    channels; any other keeps its own class."""
    new = copy.deepcopy(model)
    graph = channel_graph.trace(new)
    removed = graph.removed_ids(kept_filters(new, mask, graph))
    kept = lambda roots: torch.tensor([r not in removed for r in roots], dtype=torch.bool)  # noqa: E731
    target: nn.Module = graph.traced if graph.pad_roots else new
    for name, layer in chain(new):
        out_k = kept(graph.out_roots[name])
        depthwise = name in graph.depthwise  # its one input per filter goes with the filter
        in_k = (torch.ones(1, dtype=torch.bool) if depthwise
                else kept(graph.in_roots[name]).repeat_interleave(channel_graph.in_factor(new, graph, name)))
        m = mask.get(f"{name}.weight")  # an ignored layer has no mask of its own; masks may sit on the CPU
        dev = layer.weight.device
        out_k, in_k = out_k.to(dev), in_k.to(dev)
        w = (layer.weight if m is None else layer.weight * m.to(dev, layer.weight.dtype))[out_k][:, in_k]
        if isinstance(layer, nn.Conv2d):
            k = int(out_k.sum())
            small = nn.Conv2d(k if depthwise else int(in_k.sum()), k, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, groups=k if depthwise else 1, bias=layer.bias is not None,
                              padding_mode=layer.padding_mode)
        else:
            small = nn.Linear(int(in_k.sum()), int(out_k.sum()), bias=layer.bias is not None)
        small = small.to(device=layer.weight.device, dtype=layer.weight.dtype)
        small.weight.copy_(w)
        if layer.bias is not None:
            small.bias.copy_(layer.bias[out_k])
        _replace(target, name, small)
    for name, roots in graph.norm_roots.items():
        _replace(target, name, _slice_bn(new.get_submodule(name), kept(roots)))
    if graph.pad_roots:
        for node in graph.traced.graph.nodes:
            if node.name in graph.pad_roots:
                lead, trail = (int(kept(r).sum()) for r in graph.pad_roots[node.name])
                x, pads = node.args[0], list(node.args[1])
                at = len(pads) - 2  # the channel dim's pair comes last (channel_graph refuses batch pads)
                pads[at:at + 2] = [lead, trail]
                node.args = (x, tuple(pads), *node.args[2:])
        graph.traced.recompile()
    return target


def _out_units(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def _slice_bn(bn: nn.Module, k: torch.Tensor) -> nn.Module:
    small = type(bn)(int(k.sum()), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                     device=bn.weight.device if bn.affine else None)
    small.load_state_dict({n: (t[k.to(t.device)] if t.dim() else t) for n, t in bn.state_dict().items()})
    return small


def _replace(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def cost(model: nn.Module, in_shape: tuple[int, ...], mask: Mask | None = None) -> dict[str, Any]:
    """Parameters and FLOPs (2 per multiply-add) of Conv/Linear layers, counting only kept
    weights when a mask is given; plus all parameters of the module as it is."""
    multiply_adds, weights = 0, 0
    for n, (numel, uses) in flops.layer_work(model, in_shape).items():
        kept = int(mask[f"{n}.weight"].sum()) if mask and f"{n}.weight" in mask else numel
        weights += kept
        multiply_adds += kept * uses
    return {"weights": weights, "flops": 2 * multiply_adds, "parameters": sum(p.numel() for p in model.parameters())}
