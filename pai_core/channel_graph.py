"""Which channels of a network must be removed together, for any net torch.fx can trace.

Removing filter c of a conv is sound only if everything that reads that channel loses it too
(the next layers' input channel c, the BatchNorm entry c), and, across a residual connection,
channel c of every layer whose output is summed with it: a residual add ties the channels of
its operands into one group (Fang et al. 2023, DepGraph's "dependency groups"). A chain net has
one group per filter; a ResNet's residual stream is one group per channel, spanning the stem
and every block's last conv of a stage, and with He et al.'s option A (zero-padding shortcut)
channel c of stage 1 stays tied to channel c of every later stage.

How: trace the net symbolically (no input, no weights: the meta-device net works), give every
channel of every intermediate tensor an element of a union-find, and merge elements wherever an
op makes two channels one (elementwise ops, BatchNorm, adds). A group is a class of elements
that some Conv/Linear produces. Groups that reach the network's input or output are pinned
(never pruned). Ops whose channel mapping is not known here are refused by name, rather than
guessed. Families gather the groups with the same producing layers: a chain layer's filters,
one stage's residual stream; `layerwise` pruning keeps the same fraction of each family.
The per-op rules live in channel_rules.py; this module holds the result and its API.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

LAYERS = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class ChannelGraphError(ValueError):
    """The net holds an op whose channel mapping this module does not know."""


@dataclass(frozen=True)
class Group:
    """Channels removed together: (layer, out channel) filters, (layer, in channel) inputs,
    (norm, entry) BatchNorm entries and (pad node, position) constant channels."""
    producers: tuple[tuple[str, int], ...]
    consumers: tuple[tuple[str, int], ...]
    norms: tuple[tuple[str, int], ...]
    pads: tuple[tuple[str, int], ...]

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for n, _ in self.producers))


@dataclass
class ChannelGraph:
    """The traced net's groups. `families`: prunable groups by family name (the family's first
    producing layer in module order), each in its first layer's channel order."""
    families: dict[str, list[Group]]
    out_roots: dict[str, list[int]]   # layer -> group id of each output channel
    in_roots: dict[str, list[int]]    # layer -> group id of each input channel (before any flatten)
    norm_roots: dict[str, list[int]]  # BatchNorm -> group id of each entry
    pad_roots: dict[str, tuple[list[int], list[int]]]  # F.pad node -> group ids of its leading/trailing channels
    group_ids: dict[str, list[int]]   # family -> the group id of each of its groups
    traced: fx.GraphModule = field(repr=False)
    depthwise: frozenset[str] = frozenset()  # depthwise convs: filter c is channel c, no input columns

    def removed_ids(self, keep: dict[str, torch.Tensor]) -> set[int]:
        """Group ids a per-family keep vector removes (families absent from `keep` keep all)."""
        return {gid for fam, k in keep.items() for gid, kept in zip(self.group_ids[fam], k.tolist()) if not kept}


class _Tracer(fx.Tracer):
    """Leaves are torch's own modules (the default), so custom blocks are traced through."""


def trace(model: nn.Module) -> ChannelGraph:
    """The channel groups of `model`; ChannelGraphError names the first op it cannot map."""
    from pai_core.channel_rules import Builder

    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # data-dependent control flow and the like
        raise ChannelGraphError(f"torch.fx cannot trace {type(model).__name__}: {e}") from e
    return Builder(model, fx.GraphModule(model, graph)).build()


def in_factor(model: nn.Module, graph: ChannelGraph, layer: str) -> int:
    """How many inputs of `layer` each of its input channels feeds (a flatten's spatial size)."""
    m = model.get_submodule(layer)
    width = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
    return width // len(graph.in_roots[layer])
