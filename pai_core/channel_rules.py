"""The op rules of channel_graph: how each traced op maps its inputs' channels to its
output's, as merges in a union-find over every channel of every tensor. An op missing here is
refused by name (ChannelGraphError); supporting a new one is a rule in `Builder.visit_*`."""
from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from pai_core.channel_graph import LAYERS, NORMS, ChannelGraph, ChannelGraphError, Group

# Modules and functions that map channel c to channel c (activations, dropout, pooling).
_SAME_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.ELU,
                 nn.Hardswish, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_SAME_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, torch.sigmoid,
                   torch.tanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_SAME_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
_MERGE_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul}
_MERGE_METHODS = {"add", "add_", "mul", "mul_"}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}


@dataclass
class _Chan:
    """A tensor's channels: one union-find element each. `flat`: the channel dim was flattened
    with the spatial dims after it, each channel repeated by a factor the consumer reveals."""
    elems: list[int] | None
    flat: bool = False


class Builder:
    def __init__(self, model: nn.Module, gm: fx.GraphModule):
        self.model, self.gm = model, gm
        self.modules = dict(model.named_modules())
        self.parent: list[int] = []
        self.pinned: set[int] = set()
        self.chan: dict[fx.Node, _Chan] = {}
        self.out_elems: dict[str, list[int]] = {}
        self.in_elems: dict[str, list[int]] = {}
        self.norm_elems: dict[str, list[int]] = {}
        self.pad_elems: dict[str, tuple[list[int], list[int]]] = {}
        self.depthwise: set[str] = set()  # depthwise convs: producers of their input's channels, no inputs of their own

    # -- union-find --------------------------------------------------------------------------
    def fresh(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, e: int) -> int:
        while self.parent[e] != e:
            self.parent[e] = self.parent[self.parent[e]]
            e = self.parent[e]
        return e

    def union(self, a: list[int], b: list[int], what: str) -> None:
        if len(a) != len(b):
            raise ChannelGraphError(f"{what}: operands have {len(a)} and {len(b)} channels (broadcasting over "
                                    "channels is not supported)")
        for x, y in zip(a, b):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    # -- walking the graph -------------------------------------------------------------------
    def build(self) -> ChannelGraph:
        for node in self.gm.graph.nodes:
            self.visit(node)
        return self.collect()

    def tensor_arg(self, node: fx.Node, what: str) -> _Chan:
        arg = node.args[0] if node.args else None
        if not isinstance(arg, fx.Node) or arg not in self.chan:
            raise ChannelGraphError(f"{what}: its input is not a traced tensor")
        return self.chan[arg]

    def visit(self, node: fx.Node) -> None:
        what = f"node {node.name!r} ({node.op} {_target_name(node)})"
        if node.op == "placeholder":
            self.chan[node] = _Chan(None)  # the input's width shows at its first layer (input_of)
            return
        if node.op == "output":
            for arg in _flatten_args(node.args):
                if isinstance(arg, fx.Node) and arg in self.chan and self.chan[arg].elems is not None:
                    self.pinned.update(self.chan[arg].elems)
            return
        if node.op == "get_attr":
            raise ChannelGraphError(f"{what}: a parameter used outside its module; channel mapping unknown")
        if node.op == "call_module":
            self.visit_module(node, self.modules[node.target], what)
        elif node.op == "call_function":
            self.visit_function(node, node.target, what)
        elif node.op == "call_method":
            self.visit_method(node, what)

    def input_of(self, node: fx.Node, width: int, what: str) -> _Chan:
        """The input's channels; the network input gets `width` pinned elements on first use."""
        c = self.tensor_arg(node, what)
        if c.elems is None:
            c.elems = self.fresh(width)
            self.pinned.update(c.elems)
        return c

    def visit_module(self, node: fx.Node, m: nn.Module, what: str) -> None:
        name = node.target
        if isinstance(m, LAYERS):
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                if m.groups == m.in_channels == m.out_channels:  # depthwise (MobileNet): channel c in is c out
                    c = self.input_of(node, m.in_channels, what)
                    if c.flat or len(c.elems) != m.in_channels:
                        raise ChannelGraphError(f"{what}: expects {m.in_channels} input channels")
                    self.out_elems[name] = list(c.elems)  # its filter c belongs to channel c's group
                    self.depthwise.add(name)
                    self.chan[node] = _Chan(list(c.elems))
                    return
                raise ChannelGraphError(f"{what}: a grouped convolution (groups={m.groups}); supported: groups=1 "
                                        f"or depthwise (groups = in = out channels)")
            width = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            c = self.input_of(node, width, what)
            if c.flat:
                if not isinstance(m, nn.Linear) or m.in_features % len(c.elems):
                    raise ChannelGraphError(f"{what}: {m.in_features if isinstance(m, nn.Linear) else '?'} inputs "
                                            f"after flattening {len(c.elems)} channels")
            elif len(c.elems) != width:
                raise ChannelGraphError(f"{what}: expects {width} input channels, gets {len(c.elems)}")
            self.in_elems[name] = list(c.elems)
            out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            self.out_elems[name] = self.fresh(out)
            self.chan[node] = _Chan(list(self.out_elems[name]))
        elif isinstance(m, NORMS):
            c = self.input_of(node, m.num_features, what)
            if c.flat or len(c.elems) != m.num_features:
                raise ChannelGraphError(f"{what}: {m.num_features} entries for {len(c.elems)} channels")
            self.norm_elems[name] = list(c.elems)
            self.chan[node] = _Chan(list(c.elems))
        elif isinstance(m, _SAME_MODULES):
            self.chan[node] = self.tensor_arg(node, what)
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise ChannelGraphError(f"{what}: Flatten({m.start_dim}, {m.end_dim}); supported: start_dim=1, end_dim=-1")
            self.chan[node] = self.flattened(node, what)
        else:
            raise ChannelGraphError(f"{what}: channel mapping of {type(m).__name__} unknown; supported modules: "
                                    f"Conv2d (groups=1), Linear, BatchNorm, Flatten, activations, dropout, pooling")

    def flattened(self, node: fx.Node, what: str) -> _Chan:
        c = self.tensor_arg(node, what)
        if c.elems is None:  # flattening the network input: its width shows at the consumer
            return c
        return _Chan(c.elems, flat=True)

    def visit_function(self, node: fx.Node, fn: object, what: str) -> None:
        if fn in _SAME_FUNCTIONS:
            self.chan[node] = self.tensor_arg(node, what)
        elif fn in _MERGE_FUNCTIONS:
            self.merge(node, what)
        elif fn is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            if start != 1:
                raise ChannelGraphError(f"{what}: torch.flatten from dim {start}; supported: 1")
            self.chan[node] = self.flattened(node, what)
        elif fn is operator.getitem:
            self.getitem(node, what)
        elif fn is F.pad:
            self.pad(node, what)
        elif fn is torch.cat:
            self.cat(node, what)
        elif fn in (torch.mean, torch.sum, torch.amax):
            self.reduce(node, what)
        else:
            raise ChannelGraphError(f"{what}: channel mapping unknown; supported functions: activations, pooling, "
                                    "add/mul, flatten, spatial slicing, F.pad, torch.cat, spatial mean")

    def visit_method(self, node: fx.Node, what: str) -> None:
        method = node.target
        if method in ("size", "dim"):
            return  # not a tensor
        if method in _SAME_METHODS:
            self.chan[node] = self.tensor_arg(node, what)
        elif method in _MERGE_METHODS:
            self.merge(node, what)
        elif method in _FLATTEN_METHODS:
            shape = node.args[1:]
            batch_then_rest = (len(shape) == 2 and shape[1] == -1) or (method == "flatten" and shape in ((1,), ()))
            if method == "flatten" and shape == ():
                raise ChannelGraphError(f"{what}: flatten() merges the batch dim; supported: flatten(1)")
            if not batch_then_rest:
                raise ChannelGraphError(f"{what}: {method}{tuple(shape)}; supported: flatten(1) or "
                                        f"{method}(batch, -1)")
            self.chan[node] = self.flattened(node, what)
        elif method in ("mean", "sum", "amax"):
            self.reduce(node, what)
        else:
            raise ChannelGraphError(f"{what}: channel mapping of Tensor.{method} unknown")

    def merge(self, node: fx.Node, what: str) -> None:
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node) and a in self.chan]
        if not tensors:
            raise ChannelGraphError(f"{what}: no traced tensor operand")
        first = self.chan[tensors[0]]
        for other in tensors[1:]:
            c = self.chan[other]
            if first.elems is None or c.elems is None:
                raise ChannelGraphError(f"{what}: combines the network input before any layer")
            if first.flat != c.flat:
                raise ChannelGraphError(f"{what}: combines a flattened tensor with an unflattened one")
            self.union(first.elems, c.elems, what)
        self.chan[node] = first

    def getitem(self, node: fx.Node, what: str) -> None:
        base, index = node.args
        if not isinstance(base, fx.Node) or base not in self.chan:
            return  # indexing a non-tensor (a size tuple): nothing to map
        idx = index if isinstance(index, tuple) else (index,)
        full = slice(None)
        if len(idx) >= 2 and idx[0] == full and idx[1] == full and all(isinstance(i, slice) for i in idx):
            self.chan[node] = self.chan[base]  # spatial slicing: channels untouched
            return
        raise ChannelGraphError(f"{what}: indexing {index!r}; supported: slicing the dims after the channels")

    def pad(self, node: fx.Node, what: str) -> None:
        c = self.tensor_arg(node, what)
        pads = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
        ndim = _tensor_ndim(node.args[0])
        if c.elems is None or c.flat or ndim is None:
            raise ChannelGraphError(f"{what}: F.pad needs a 4-D (N, C, H, W) feature map after a layer")
        k = ndim - 2  # index of the channel dim's pair, counted from the last dim
        pairs = [tuple(pads[i:i + 2]) for i in range(0, len(pads), 2)]
        if len(pairs) > k + 1:
            raise ChannelGraphError(f"{what}: F.pad pads the batch dim")
        if len(pairs) <= k:  # spatial padding only: the channels pass through
            self.chan[node] = c
            return
        before, after = pairs[k]  # the last pair (a batch pair is refused above): physically_prune relies on it
        if not (isinstance(before, int) and isinstance(after, int)) or before < 0 or after < 0:
            raise ChannelGraphError(f"{what}: F.pad channel amounts {before, after}; supported: non-negative ints")
        lead, trail = self.fresh(before), self.fresh(after)
        self.pad_elems[node.name] = (lead, trail)
        self.chan[node] = _Chan(lead + list(c.elems) + trail)

    def cat(self, node: fx.Node, what: str) -> None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        chans = [self.chan.get(t) for t in tensors]
        if any(c is None or c.elems is None or c.flat for c in chans):
            raise ChannelGraphError(f"{what}: torch.cat of tensors that are not feature maps after a layer")
        if dim == 1:
            self.chan[node] = _Chan([e for c in chans for e in c.elems])
        elif dim in (2, 3, -1, -2):
            for c in chans[1:]:
                self.union(chans[0].elems, c.elems, what)
            self.chan[node] = chans[0]
        else:
            raise ChannelGraphError(f"{what}: torch.cat over dim {dim}; supported: 1 (channels) or a spatial dim")

    def reduce(self, node: fx.Node, what: str) -> None:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else dims
        if not dims or any(d in (0, 1) for d in dims):
            raise ChannelGraphError(f"{what}: a reduction over dims {dims}; supported: spatial dims only")
        self.chan[node] = self.tensor_arg(node, what)

    # -- the result --------------------------------------------------------------------------
    def collect(self) -> ChannelGraph:
        find = self.find
        pinned = {find(e) for e in self.pinned}
        members: dict[int, dict[str, list]] = {}

        def add(kind: str, elems: Iterable[int], owner: str) -> None:
            for i, e in enumerate(elems):
                members.setdefault(find(e), {"p": [], "c": [], "n": [], "z": []})[kind].append((owner, i))

        for name, elems in self.out_elems.items():
            add("p", elems, name)
        for name, elems in self.in_elems.items():
            add("c", elems, name)
        for name, elems in self.norm_elems.items():
            add("n", elems, name)
        for name, (lead, trail) in self.pad_elems.items():
            add("z", lead + trail, name)
        order = {n: i for i, n in enumerate(self.modules)}
        by_producers: dict[tuple[str, ...], list[tuple[int, Group]]] = {}
        for root, m in members.items():
            if root in pinned or not m["p"]:
                continue
            g = Group(*(tuple(m[k]) for k in "pcnz"))
            layers = tuple(sorted(g.layers, key=order.__getitem__))
            by_producers.setdefault(layers, []).append((root, g))
        families: dict[str, list[Group]] = {}
        group_ids: dict[str, list[int]] = {}
        for layers in sorted(by_producers, key=lambda ls: [order[n] for n in ls]):
            first = layers[0]
            groups = sorted(by_producers[layers], key=lambda rg: min(i for n, i in rg[1].producers if n == first))
            name = first
            while name in families:  # two families led by the same layer: a suffix tells them apart
                name += "'"
            families[name] = [g for _, g in groups]
            group_ids[name] = [r for r, _ in groups]
        roots = lambda elems: [find(e) for e in elems]  # noqa: E731
        return ChannelGraph(
            families=families,
            out_roots={n: roots(e) for n, e in self.out_elems.items()},
            in_roots={n: roots(e) for n, e in self.in_elems.items()},
            norm_roots={n: roots(e) for n, e in self.norm_elems.items()},
            pad_roots={n: (roots(a), roots(b)) for n, (a, b) in self.pad_elems.items()},
            group_ids=group_ids, traced=self.gm, depthwise=frozenset(self.depthwise))


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def _flatten_args(args: object) -> list:
    if isinstance(args, (tuple, list)):
        return [x for a in args for x in _flatten_args(a)]
    if isinstance(args, dict):
        return [x for a in args.values() for x in _flatten_args(a)]
    return [args]


def _tensor_ndim(node: object) -> int | None:
    """Rank of a traced feature map, known from the layers before it (Conv2d outputs are 4-D)."""
    seen = node
    while isinstance(seen, fx.Node):
        if seen.op == "call_module":
            m = seen.graph.owning_module.get_submodule(seen.target)
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                return 4
            if isinstance(m, (nn.Linear, nn.BatchNorm1d, nn.Flatten)):
                return 2
        if seen.op == "placeholder":
            return None
        seen = seen.args[0] if seen.args else None
    return None
