"""Early-bird tickets (You et al., ICLR 2020): the mask a network will end with is drawn early
in training, so pretraining can stop as soon as it stops changing.

During the (low-cost) pretraining, a mask at the target sparsity is drawn at every epoch end;
the normalized Hamming distance between the newest mask and each of the previous window-1
ones is measured, and once every one of them is below ε (default 0.1, window 5, as the
authors' `EarlyBird.early_bird_emerge`) the ticket is drawn: training stops there, the mask is
that epoch's, and the network is pruned and retrained (from the ticket's weights, the
authors' `retrain_continue`, or from the init). The epoch and the fraction of pretraining
saved are recorded.

- `structure: channel` (the paper's): network slimming on any net with BatchNorm whose channel
  groups pai_core.channel_graph finds (chain nets, ResNets, WRN, MobileNetV2). A channel
  group's score is the |γ| of the BatchNorm after its filter (the largest over its filters when
  a residual add ties several: PaT's `bn_scale` with `filter_norm: max`); one global ranking over
  the candidate groups keeps all but int(N · sparsity) of them, each family first keeping its
  best one (as PaT's global filter selection; the reference's pruning keeps one channel of a
  BatchNorm its threshold empties), with an L1 penalty on every γ during the search (`l1`,
  1e-4 as `--sr --s 0.0001`). A dropped group removes its filters and every input they feed
  (structured.filter_mask), so `prune.physical` can build the smaller net. The distance is over
  the candidate groups' keep/drop decisions.
- Which groups are candidates (`filter_layers`): `unshared` (default), those no residual add
  ties (one layer writes them), which leaves a residual net's stream whole. That is the reference's choice on its
  PreResNet (`resprune.py`): it shrinks only the convs inside a block and keeps every block's
  output width. The reference still ranks the stream's BatchNorms, which in its pre-activation
  blocks read the stream, and uses their masks to pick each block's input channels
  (`channel_selection`); our post-activation BNs write the stream, so they are left out of the
  ranking and the distance instead. `batch_norm` also ranks the stream: its channel c goes in the
  stem and every block at once. On a chain net both are every BatchNorm channel, the paper's VGG
  setting.
- `structure: unstructured`: global magnitude over the prunable weights.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from pai_core import channel_graph, structured
from pai_core.callbacks import register_callback
from pai_core.masks import Mask, dense_mask
from pai_core.models import model_info, model_names
from pai_core.paradigms.registry import register_paradigm
from pai_core.plan import Plan, Round, dense_round, evaluate_node, train_node
from pai_core.prune_checks import meta_model
from pai_core.selection import select
from pai_core.specs import ExperimentBase, Frozen, PruneSpec, TrainSpec, schedule_help
from pai_core.training import Callback, TrainState

CHANNEL_LAYERS = ("unshared", "batch_norm")  # early_bird.filter_layers; the first is the default


class EarlyBirdOptions(Frozen):
    structure: Literal["channel", "unstructured"] = Field(
        "channel", description="channel: BN scales (network slimming, the paper's); unstructured: |w|")
    epsilon: float = Field(0.1, gt=0, lt=1, description="the ticket is drawn when every distance in the window is below")
    window: int = Field(5, ge=2, description="masks compared: the newest against the window-1 before it")
    l1: float = Field(1e-4, ge=0, description="channel: L1 penalty on BN scales during the search (slimming)")
    retrain_from: Literal["ticket", "init"] = Field("ticket", description="the weights the pruned net retrains from")
    filter_layers: Literal["unshared", "batch_norm"] = Field(
        "unshared", description="channel: the BatchNorm channels ranked and pruned: unshared (those one layer makes "
                                "alone: a residual net keeps its stream whole, as the reference's ResNet pruning) or "
                                "batch_norm (a residual stream's channels too, each in all its layers at once); on a "
                                "chain net both are every BatchNorm channel")


class OneShotMagnitude(PruneSpec):
    NM_REFUSED = "early_bird cannot keep an N:M pattern: its tickets are masks by global magnitude or BN channels"
    schedule: Literal["one_shot"] = Field("one_shot", description=schedule_help("one_shot"))
    physical: bool = Field(False, description="early_bird.structure channel: also build and evaluate the smaller "
                                              "dense net")

    @model_validator(mode="after")
    def _magnitude(self) -> OneShotMagnitude:
        if self.criterion != "magnitude" or self.scope != "global":
            raise ValueError("prune.criterion: early_bird draws its masks by magnitude (|w| or BN |γ|) over the "
                             "whole net; allowed: criterion magnitude with scope global")
        if self.sparsity is None:
            raise ValueError("prune.sparsity: early_bird needs it (the fraction of channels or weights pruned)")
        if self.min_density:
            raise ValueError("prune.min_density: early_bird draws its masks without per-layer floors; allowed: 0")
        return self


class EarlyBirdSpec(ExperimentBase):
    flow: Literal["early_bird"] = "early_bird"
    retrain: TrainSpec | None = Field(None, description="the retraining of the pruned net; defaults to train")
    prune: OneShotMagnitude = Field(description="the ticket's sparsity (drawn by magnitude)")
    early_bird: EarlyBirdOptions = Field(EarlyBirdOptions(), description="when a ticket counts as drawn")

    @model_validator(mode="after")
    def _channels(self) -> EarlyBirdSpec:
        channel = self.early_bird.structure == "channel"
        if channel and not model_info(self.model.name).has_batch_norm(self.model.params):
            with_bn = [m if model_info(m).batch_norm is True else f"{m} with {model_info(m).batch_norm}: true"
                       for m in model_names() if model_info(m).batch_norm]
            raise ValueError(f"early_bird.structure: channel ranks BatchNorm scales, and this {self.model.name} has "
                             f"no BatchNorm; allowed: a model with BatchNorm ({', '.join(with_bn)}), or structure "
                             "unstructured")
        if self.train.epochs is not None and self.early_bird.window > self.train.epochs:
            raise ValueError(f"early_bird.window: {self.early_bird.window} masks (one per epoch) never fit in the "
                             f"{self.train.epochs} pretraining epochs, so no ticket could be drawn; allowed: "
                             f"2..{self.train.epochs}")
        if not channel:
            if self.early_bird.filter_layers != CHANNEL_LAYERS[0]:
                raise ValueError("early_bird.filter_layers: only structure channel uses it; allowed: unshared")
            if self.prune.physical:
                raise ValueError("prune.physical: the smaller net exists only for early_bird.structure channel; "
                                 "allowed: false")
            return self
        if self.prune.ignore:
            raise ValueError("prune.ignore: the channel search ranks every BatchNorm channel at once; allowed: [] "
                             "(or early_bird.structure unstructured)")
        if self.train.bn_l1:
            raise ValueError("train.bn_l1: the channel search applies early_bird.l1 to the BatchNorm scales itself; "
                             "allowed: 0 (set early_bird.l1 instead)")
        try:
            families = channel_families(meta_model(self), self.early_bird.filter_layers)
        except channel_graph.ChannelGraphError as e:
            raise ValueError(f"early_bird.structure: channel needs the channel groups of {self.model.name}: {e}; "
                             "allowed: unstructured") from e
        if not families:
            raise ValueError(f"early_bird.filter_layers: {self.model.name} has no {self.early_bird.filter_layers} "
                             f"BatchNorm channel to prune; allowed: {', '.join(CHANNEL_LAYERS)}")
        total = sum(len(gs) for gs in families.values())
        kept = total - int(total * self.prune.sparsity)  # channel_keep's count
        if kept < len(families):
            raise ValueError(f"prune.sparsity: keeps {kept} of the {total} BatchNorm channels, fewer than one "
                             f"per layer ({len(families)}), so a layer would be empty")
        return self

    def pruned_units(self) -> tuple | None:
        return None if self.early_bird.structure == "channel" else super().pruned_units()  # channels: above

    @property
    def retrain_spec(self) -> TrainSpec:
        return self.retrain or self.train


def channel_families(model: nn.Module, layers: str = "unshared", graph: channel_graph.ChannelGraph | None = None
                     ) -> dict[str, list[channel_graph.Group]]:
    """The candidate channel groups, by family: those a BatchNorm follows in every filter that
    writes them (structured.unit_families' `batch_norm`), and with `unshared` only those that no
    residual add ties (its `unshared`: one layer writes them, a depthwise conv after it aside). A
    chain net's are its BatchNorm channels, layer by layer, in module order."""
    if layers not in CHANNEL_LAYERS:
        raise ValueError(f"early_bird.filter_layers {layers!r}; allowed: {', '.join(CHANNEL_LAYERS)}")
    graph = graph or channel_graph.trace(model)
    families = structured.unit_families(model, "batch_norm", graph)
    if layers == "unshared":
        alone = structured.unit_families(model, "unshared", graph)
        families = {f: gs for f, gs in families.items() if f in alone}
    return families


def channel_scales(model: nn.Module, families: dict[str, list[channel_graph.Group]]) -> dict[str, torch.Tensor]:
    """Per family, each group's |γ|: of the BatchNorm after its filter, the largest over the filters
    a residual add ties (what PaT's bn_scale with filter_norm max ranks)."""
    modules = dict(model.named_modules())
    gamma = {layer: modules[bn].weight.detach().abs().cpu() for layer, bn in structured.bn_after(model).items()}
    return {f: torch.stack([torch.stack([gamma[n][c] for n, c in g.producers]).amax() for g in gs])
            for f, gs in families.items()}


def channel_keep(model: nn.Module, families: dict[str, list[channel_graph.Group]], sparsity: float
                 ) -> dict[str, torch.Tensor]:
    """Per family, the groups kept: all but int(N · sparsity) of the N candidates, by one ranking of
    |γ| (ties to the lower index), each family first keeping its best group (a global threshold may
    otherwise empty a layer: the physically smaller net could not exist). The authors' code keeps
    |γ| above the value at that index, which prunes one channel more; we prune exactly the stated
    fraction. A chain net's masks are the ones this paradigm drew before residual nets were
    supported, except where that emptied a layer (tests/test_early_bird.py)."""
    scales = channel_scales(model, families)
    names = list(scales)
    flat = torch.cat([scales[n] for n in names])
    keep = torch.zeros(len(flat), dtype=torch.bool)
    at = 0
    for n in names:  # each family's best (argmax: the first of equal maxima, as the stable sort)
        keep[at + int(torch.argmax(scales[n]))] = True
        at += len(scales[n])
    order = torch.sort(flat, descending=True, stable=True).indices
    rest = len(flat) - int(len(flat) * sparsity) - int(keep.sum())
    keep[order[~keep[order]][:max(rest, 0)]] = True
    return dict(zip(names, torch.split(keep, [len(scales[n]) for n in names])))


def channel_weight_mask(model: nn.Module, keep: dict[str, torch.Tensor],
                        graph: channel_graph.ChannelGraph | None = None) -> Mask:
    """Weights that remove the dropped groups' filters and every input they feed (residual adds
    included): structured.filter_mask, the mask PaT's filter pruning makes."""
    return structured.filter_mask(model, keep, graph)


class EarlyBird(Callback):
    def __init__(self, cfg: dict[str, Any], total: int):
        self.cfg, self.total = cfg, total
        self.masks: list[torch.Tensor] = []   # the last `window` masks, flattened
        self.distances: list[float] = []       # per epoch: the largest distance in the window
        self.found: dict[str, Any] | None = None
        self._graph: tuple[channel_graph.ChannelGraph, dict, list] | None = None  # traced once: the net is fixed

    def draw(self, model: nn.Module) -> tuple[torch.Tensor, Mask]:
        """This epoch's mask: flattened (for distances) and as weight masks (for pruning). Channel
        decisions are flattened in the order of their first BatchNorm's name, as the chain-only code
        did (a search checkpointed by it resumes comparing like with like)."""
        if self.cfg["structure"] == "channel":
            if self._graph is None:
                graph = channel_graph.trace(model)
                families = channel_families(model, self.cfg.get("filter_layers", CHANNEL_LAYERS[0]), graph)
                self._graph = graph, families, sorted(families, key=structured.bn_after(model).__getitem__)
            graph, families, order = self._graph
            keep = channel_keep(model, families, self.cfg["sparsity"])
            return torch.cat([keep[f] for f in order]), channel_weight_mask(model, keep, graph)
        dense = dense_mask(model, ignore=self.cfg.get("ignore", ()))
        scores = {n: p.detach().abs().cpu() for n, p in model.named_parameters() if n in dense}
        mask = select(scores, dense, 1 - self.cfg["sparsity"], "global", 0.0)
        return torch.cat([mask[n].reshape(-1) for n in sorted(mask)]), mask

    def after_backward(self, state: TrainState) -> None:
        if self.cfg["structure"] == "channel" and self.cfg["l1"]:  # network slimming's subgradient
            structured.bn_l1_subgradient(state.model, self.cfg["l1"])

    def on_epoch_end(self, state: TrainState, row: dict[str, float]) -> None:
        flat, mask = self.draw(state.model)
        self.masks = (self.masks + [flat])[-self.cfg["window"]:]
        if len(self.masks) < self.cfg["window"]:
            return
        dist = max(float((flat != old).double().mean()) for old in self.masks[:-1])
        self.distances.append(dist)
        if dist < self.cfg["epsilon"]:
            self.found = {"epoch": row["epoch"], "iteration": state.it, "saved": 1 - state.it / self.total,
                          "distance": dist}
            state.stop, state.mask = True, mask

    def on_end(self, state: TrainState) -> None:
        if self.found is None:  # no ticket emerged: the mask of the fully trained net
            state.mask = self.draw(state.model)[1]

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks, "distances": self.distances}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks, self.distances = list(state["masks"]), list(state["distances"])

    def record(self) -> dict[str, Any]:
        return {"stopped_early": {**(self.found or {"epoch": None, "saved": 0.0}), "distances": self.distances}}


@register_callback("early_bird")
def _early_bird(cfg: dict, total: int, key: str) -> EarlyBird:
    return EarlyBird(cfg, total)


def plan(spec: EarlyBirdSpec) -> Plan:
    """init -> search (stops at the ticket) -> retrain the pruned net -> evaluate; plus the dense round."""
    init, dense = dense_round(spec)
    eb = spec.early_bird
    cfg = {"structure": eb.structure, "epsilon": eb.epsilon, "window": eb.window, "sparsity": spec.prune.sparsity,
           "l1": eb.l1 if eb.structure == "channel" else 0.0}
    cfg |= {"ignore": spec.prune.ignore} if spec.prune.ignore else {}
    cfg |= {"filter_layers": eb.filter_layers} if eb.filter_layers != CHANNEL_LAYERS[0] else {}  # keys as before
    search = train_node(spec, "eb_search", init, spec.train, early_bird=cfg)
    start = search if eb.retrain_from == "ticket" else init
    retrain = train_node(spec, "retrain", start, spec.retrain_spec, mask=search, mode="finetune")
    density = 1 - spec.prune.sparsity
    return Plan("early_bird", [dense, Round(1, "early-bird", density, search, retrain,
                                            evaluate_node(spec, retrain, search, physical=spec.prune.physical))])


def label(spec: EarlyBirdSpec, rnd: Round) -> str:
    eb = spec.early_bird
    return f"early-bird ({eb.structure}{'' if eb.filter_layers == CHANNEL_LAYERS[0] else ' ' + eb.filter_layers})"


PARADIGM = register_paradigm("early_bird", EarlyBirdSpec, plan, label,
                             "You et al.: draw the ticket once the mask stops changing, stop pretraining, retrain",
                             __doc__)
