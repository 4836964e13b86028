"""PHEW (Patil & Dovrolis, ICML 2021): a data-free mask of Paths with Higher Edge Weights.

Biased random walks through the init, alternately forward from an input unit (round-robin over
the inputs) to an output and backward from an output unit (round-robin) to an input. At each
unit the next weight is one of those leaving it (entering it, going backward), drawn with
probability ∝ |w|. A conv kernel is the edge between two channels, so this is the paper's rule:
a kernel ∝ its L1 norm, then one of its weights ∝ |w|. The mask is the union of the weights
walked, in the order they were first walked, until it holds the round's kept count: the score
is that order (earlier = higher), so the global top-k selection keeps exactly PHEW's mask and
exactly k weights (the last walk stops where it adds the k-th). Weights already pruned, and
layers left out by `prune.ignore`, are walked with their (masked) |w| and never counted.

Walks are drawn `CHUNK` at a time per direction on tensors; a walk's place in the sequential
order (forward 0, backward 0, forward 1, ...) decides which weight came first, so the result is
the sequential algorithm's, and one generator state always gives the same walks whatever the
kept count (so its mask at a higher density contains the one at a lower density; the score stage
seeds the generator from its key, which holds the density, so two densities draw two walk sets).

Residual nets: a shortcut is a connection without a weight, so the walks run on the graph with
shortcuts contracted. A layer's input channel is fed by every earlier layer that writes its
channel group (channel_graph.py: a residual add ties the channels it sums), so from a unit a
forward walk may enter the next block or skip it, each weight reading the unit drawn ∝ |w|;
a backward walk draws a weight ∝ |w| and then, uniformly, one of the units feeding it. The
reference code instead skips a block with probability 1/2, by the positions of the layers in a
list. Depthwise convs are refused (their filters share their input's channel group). Two more
departures, both so that one rule holds at every layer: from a conv channel into a Linear layer
after a flatten, one of the weights reading any of that channel's features is drawn ∝ |w| (the
reference draws one of the features uniformly, then a weight ∝ |w|); the kept count is of
prunable weights (the reference counts biases too and keeps the bias of every unit walked).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pai_core.channel_graph import ChannelGraph, ChannelGraphError, in_factor, trace
from pai_core.criteria.registry import register

CHUNK = 4096  # walks per direction drawn at once; fixed, so a seed always gives the same walks
STALL_CHUNKS = 64  # chunks in a row that add no weight before the walks are given up on


class PhewError(ValueError):
    """The net has no graph the walks can follow, or its walks cannot reach the kept count."""


@dataclass(frozen=True)
class UnitGraph:
    """The net as units (its input channels or features, every output channel or feature of a
    Conv/Linear) and weights between them. A layer's input channel is a `slot`; `links` join a
    slot to the units that feed it: the previous layer's unit in a chain; through a residual add,
    every earlier layer writing that channel group (channel_graph's), since each is summed into it.
    Weights are numbered layer after layer, each layer flat, in execution order."""
    layers: list[str]           # parameter names, in execution order
    sizes: list[int]            # weights per layer
    inputs: torch.Tensor        # units of the network's input: where forward walks start
    outputs: torch.Tensor       # units nothing reads: where backward walks start
    n_units: int
    n_slots: int
    edge_slot: torch.Tensor     # int64 [E]: the slot each weight reads
    edge_out: torch.Tensor      # int64 [E]: the unit it writes
    link_slot: torch.Tensor     # int64 [L]
    link_unit: torch.Tensor     # int64 [L]


def _traced(model: nn.Module) -> ChannelGraph:
    try:
        graph = trace(model)
    except ChannelGraphError as e:
        raise PhewError(f"its walks need the net's layer graph: {e}") from None
    if graph.depthwise:  # its filters share their input's channel group, so "written before" misleads
        raise PhewError(f"{min(graph.depthwise)} is a depthwise conv; the walks follow nets of dense Conv/Linear "
                        "layers, chains or residual")
    return graph


def graph_problem(model: nn.Module) -> str | None:
    """Why PHEW cannot walk `model` (None: it can); the spec check runs it on the meta net."""
    try:
        _traced(model)
    except PhewError as e:
        return str(e)
    return None


def unit_graph(model: nn.Module) -> UnitGraph:
    """`model`'s units and weights; PhewError names what the walks cannot follow."""
    graph = _traced(model)
    layers = list(graph.out_roots)  # execution order
    writers: dict[int, list[tuple[int, int]]] = {}  # channel group -> (layer index, unit) writing it
    inputs: dict[int, int] = {}  # group -> input unit: groups read before any layer wrote them
    unit_base, slot_base, n_slots = {}, {}, 0
    for i, name in enumerate(layers):
        for g in graph.in_roots[name]:
            if g not in writers and g not in inputs:
                inputs[g] = len(inputs)
        slot_base[name], n_slots = n_slots, n_slots + len(graph.in_roots[name])
        for o, g in enumerate(graph.out_roots[name]):
            writers.setdefault(g, []).append((i, o))
    n_units = len(inputs)
    for name in layers:
        unit_base[name], n_units = n_units, n_units + len(graph.out_roots[name])
    link_slot, link_unit, edge_slot, edge_out, sizes = [], [], [], [], []
    for i, name in enumerate(layers):
        for c, g in enumerate(graph.in_roots[name]):
            sources = [unit_base[layers[j]] + o for j, o in writers.get(g, []) if j < i]
            sources += [inputs[g]] if g in inputs else []
            link_slot += [slot_base[name] + c] * len(sources)
            link_unit += sources
        w = model.get_submodule(name).weight  # a Linear, or a Conv2d with groups=1 (channel_graph's)
        width, k = w.shape[1], w[0, 0].numel()
        idx = torch.arange(w.numel())
        edge_slot.append(slot_base[name] + (idx // k) % width // in_factor(model, graph, name))
        edge_out.append(unit_base[name] + idx // (width * k))
        sizes.append(w.numel())
    links = torch.tensor(link_slot, dtype=torch.int64), torch.tensor(link_unit, dtype=torch.int64)
    read = torch.zeros(n_units, dtype=torch.bool)
    read[links[1]] = True
    outputs = (~read).nonzero().squeeze(1)
    return UnitGraph([f"{n}.weight" for n in layers], sizes, torch.arange(len(inputs)),
                     outputs[outputs >= len(inputs)], n_units, n_slots, torch.cat(edge_slot), torch.cat(edge_out),
                     *links)


class _Sampler:
    """Draws, for each walker at a unit, one edge of that unit ∝ its weight (zero never)."""

    def __init__(self, unit: torch.Tensor, weight: torch.Tensor, n_units: int):
        self.order = torch.argsort(unit, stable=True)
        w = weight[self.order]
        self.cum = torch.cumsum(w, 0)
        counts = torch.bincount(unit, minlength=n_units)
        end = torch.cumsum(counts, 0)
        start = end - counts
        zero = torch.zeros((), dtype=self.cum.dtype)
        self.base = torch.where(start > 0, self.cum[(start - 1).clamp(min=0)], zero)
        self.total = torch.where(counts > 0, self.cum[(end - 1).clamp(min=0)] - self.base, zero)
        # a draw that rounds past its block's end takes the block's last nonzero edge
        positive = (w > 0).nonzero().squeeze(1)
        self.last = torch.full((n_units,), -1, dtype=torch.int64).scatter_reduce(
            0, unit[self.order][positive], positive, "amax")

    def draw(self, units: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Flat edge index per walker, -1 where its unit has no nonzero edge (a dead end)."""
        total = self.total[units]
        j = torch.searchsorted(self.cum, self.base[units] + u * total, right=True)
        j = torch.minimum(j, self.last[units]).clamp(min=0)
        return torch.where(total > 0, self.order[j], -1)


class _Walker:
    """One step of many walks at once. Forward from a unit: a slot reading it ∝ the slot's
    total |w|, then one of the slot's weights ∝ |w|, which together is one of every weight that
    reads the unit ∝ |w|. Backward into a unit: one of its weights ∝ |w| times the number of
    units feeding that weight's slot, then one of those units uniformly: each (weight, unit)
    pair ∝ |w|, the same rule on the graph where shortcuts carry no weight."""

    def __init__(self, g: UnitGraph, weight: torch.Tensor):
        self.g = g
        mass = torch.zeros(g.n_slots, dtype=torch.float64).index_add_(0, g.edge_slot, weight)
        feeds = torch.bincount(g.link_slot, minlength=g.n_slots).double()
        self.slot_of_unit = _Sampler(g.link_unit, mass[g.link_slot], g.n_units)
        self.weight_of_slot = _Sampler(g.edge_slot, weight, g.n_slots)
        self.weight_into = _Sampler(g.edge_out, weight * feeds[g.edge_slot], g.n_units)
        self.unit_of_slot = _Sampler(g.link_slot, torch.ones(g.link_slot.numel(), dtype=torch.float64), g.n_slots)

    def forward(self, units: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        link = self.slot_of_unit.draw(units, _uniform(units, gen))
        e = self.weight_of_slot.draw(self.g.link_slot[link.clamp(min=0)], _uniform(units, gen))
        e = torch.where(link >= 0, e, -1)
        return e, self.g.edge_out[e.clamp(min=0)]

    def backward(self, units: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.weight_into.draw(units, _uniform(units, gen))
        link = self.unit_of_slot.draw(self.g.edge_slot[e.clamp(min=0)], _uniform(units, gen))
        # a weight whose slot nothing feeds (a padded channel) is walked; the walk ends there
        return e, torch.where((e >= 0) & (link >= 0), self.g.link_unit[link.clamp(min=0)], -1)


def _uniform(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(like.numel(), generator=gen, dtype=torch.float64)


def walk_order(model: nn.Module, mask: dict[str, torch.Tensor], keep: int, gen: torch.Generator,
               ) -> dict[str, torch.Tensor]:
    """Per masked parameter, each weight's rank in the order of first walks (int64: 0 = walked
    first, -1 = never), the walks stopping once `keep` masked weights have been walked."""
    g = unit_graph(model)
    if unknown := sorted(set(mask) - set(g.layers)):
        raise PhewError(f"phew walks Conv/Linear weights only; it cannot score {', '.join(unknown)}")
    named = dict(model.named_parameters())
    weight = torch.cat([named[n].detach().abs().reshape(-1).double().cpu()
                        * (mask[n].reshape(-1).cpu() if n in mask else 1) for n in g.layers])
    counted = torch.cat([torch.full((size,), n in mask) for n, size in zip(g.layers, g.sizes)])
    alive = torch.cat([mask[n].reshape(-1).cpu().bool() if n in mask else torch.zeros(size, dtype=torch.bool)
                       for n, size in zip(g.layers, g.sizes)])
    if keep >= int(alive.sum()):  # everything stays: no walk could add to that (density 1)
        return _by_param(g, mask, torch.where(alive, torch.cumsum(alive, 0) - 1, -1))
    walker, depth = _Walker(g, weight), len(g.layers)  # a walk meets each layer at most once
    never = torch.iinfo(torch.int64).max
    first = torch.full((weight.numel(),), never, dtype=torch.int64)
    seen, stalled, t0 = 0, 0, 0
    while seen < keep:
        walkers = t0 + torch.arange(CHUNK)
        for direction, seeds in ((0, g.inputs), (1, g.outputs)):  # forward walk t is walk 2t, backward 2t + 1
            units, going = seeds[walkers % seeds.numel()], torch.ones(CHUNK, dtype=torch.bool)
            for step in range(depth):
                e, units = (walker.forward if direction == 0 else walker.backward)(units, gen)
                going &= e >= 0
                code = (2 * walkers + direction) * depth + step
                first.scatter_reduce_(0, e[going], code[going], "amin")
                going &= units >= 0
                units = units.clamp(min=0)
                if not going.any():
                    break
        now = int(((first < never) & counted).sum())
        stalled = 0 if now > seen else stalled + 1
        if stalled >= STALL_CHUNKS:
            raise PhewError(f"phew: {2 * (t0 + CHUNK):,} walks reached {now:,} of the {keep:,} weights to keep; "
                            "the rest are on no path of nonzero weights (an earlier round's mask)")
        seen, t0 = now, t0 + CHUNK
    order = torch.where(counted, first, never)
    visited = (order < never).nonzero().squeeze(1)
    rank = torch.full_like(order, -1)
    rank[visited[torch.argsort(order[visited])]] = torch.arange(visited.numel())
    return _by_param(g, mask, rank)


def _by_param(g: UnitGraph, mask: dict[str, torch.Tensor], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    by_param = dict(zip(g.layers, torch.split(flat, g.sizes)))
    return {n: by_param[n].reshape(mask[n].shape) for n in mask}


@register("phew", stochastic=True, chooses_count=True, model_check=graph_problem,
          description="Patil & Dovrolis 2021: data-free, the weights on |w|-biased random walks input↔output "
                      "(no depthwise convs)")
def phew(model, mask, inputs, params) -> dict[str, torch.Tensor]:
    first = walk_order(model, mask, inputs.keep, inputs.generator)
    walked = sum(int((r >= 0).sum()) for r in first.values())
    # earlier walked = higher; never walked = 0, below every walked weight
    return {n: torch.where(r >= 0, (walked - r).double(), 0.0) for n, r in first.items()}
