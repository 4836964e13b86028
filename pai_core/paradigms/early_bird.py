"""Early-bird tickets (You et al., ICLR 2020): the mask a network will end with is drawn early
in training, so pretraining can stop as soon as it stops changing.

During the (low-cost) pretraining, a mask at the target sparsity is drawn at every epoch end;
the normalized Hamming distance between the newest mask and each of the previous window-1
ones is measured, and once every one of them is below ε (default 0.1, window 5, as the
authors' `EarlyBird.early_bird_emerge`) the ticket is drawn: training stops there, the mask is
that epoch's, and the network is pruned and retrained (from the ticket's weights, the
authors' `retrain_continue`, or from the init). The epoch and the fraction of pretraining
saved are recorded.

- `structure: channel` (the paper's): network-slimming style, on models with BatchNorm. The
  mask keeps the channels whose BN scale |γ| is above the global p-quantile, with an L1
  penalty on γ during the search (`l1`, 1e-4 as `--sr --s 0.0001`); a dropped channel removes
  its filter and the next layer's dependent inputs (chain-shaped models). The BatchNorm helpers
  (which BN follows which layer, the L1 subgradient) are pai_core.structured's, shared with
  PaT's network slimming (`train.bn_l1`, criterion `bn_scale`).
- `structure: unstructured`: global magnitude over the prunable weights.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from pai_core import structured
from pai_core.callbacks import register_callback
from pai_core.masks import Mask, dense_mask
from pai_core.models import model_info
from pai_core.paradigms.registry import register_paradigm
from pai_core.plan import Plan, Round, dense_round, evaluate_node, train_node
from pai_core.prune_checks import meta_model
from pai_core.selection import select
from pai_core.specs import ExperimentBase, Frozen, PruneSpec, TrainSpec, schedule_help
from pai_core.training import Callback, TrainState

_BN = structured.BN


class EarlyBirdOptions(Frozen):
    structure: Literal["channel", "unstructured"] = Field(
        "channel", description="channel: BN scales (network slimming, the paper's); unstructured: |w|")
    epsilon: float = Field(0.1, gt=0, lt=1, description="the ticket is drawn when every distance in the window is below")
    window: int = Field(5, ge=2, description="masks compared: the newest against the window-1 before it")
    l1: float = Field(1e-4, ge=0, description="channel: L1 penalty on BN scales during the search (slimming)")
    retrain_from: Literal["ticket", "init"] = Field("ticket", description="the weights the pruned net retrains from")


class OneShotMagnitude(PruneSpec):
    NM_REFUSED = "early_bird cannot keep an N:M pattern: its tickets are masks by global magnitude or BN channels"
    schedule: Literal["one_shot"] = Field("one_shot", description=schedule_help("one_shot"))

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
        info = model_info(self.model.name)
        if self.early_bird.structure == "channel" and not (info.chain and info.has_batch_norm(self.model.params)):
            raise ValueError(f"early_bird.structure: channel needs a chain-shaped model with BatchNorm, and "
                             f"{info.name} is not one; allowed: conv2/4/6 with batch_norm true, vgg11, vgg16; "
                             "or structure unstructured")
        if self.train.epochs is not None and self.early_bird.window > self.train.epochs:
            raise ValueError(f"early_bird.window: {self.early_bird.window} masks (one per epoch) never fit in the "
                             f"{self.train.epochs} pretraining epochs, so no ticket could be drawn; allowed: "
                             f"2..{self.train.epochs}")
        if self.early_bird.structure == "channel" and self.prune.ignore:
            raise ValueError("prune.ignore: the channel search ranks every BatchNorm channel at once; allowed: [] "
                             "(or early_bird.structure unstructured)")
        if self.early_bird.structure == "channel" and self.train.bn_l1:
            raise ValueError("train.bn_l1: the channel search applies early_bird.l1 to the BatchNorm scales itself; "
                             "allowed: 0 (set early_bird.l1 instead)")
        if self.early_bird.structure == "channel":
            bns = [m.weight.shape[0] for m in meta_model(self).modules() if isinstance(m, _BN)]
            kept = sum(bns) - int(sum(bns) * self.prune.sparsity)  # channel_keep's count
            if kept < len(bns):
                raise ValueError(f"prune.sparsity: keeps {kept} of the {sum(bns)} BatchNorm channels, fewer than one "
                                 f"per BatchNorm layer ({len(bns)}), so a layer would be empty")
        return self

    def pruned_units(self) -> tuple | None:
        return None if self.early_bird.structure == "channel" else super().pruned_units()  # channels: above

    @property
    def retrain_spec(self) -> TrainSpec:
        return self.retrain or self.train


def channel_keep(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Per BN layer, the channels with the globally largest |γ|: all but int(n · sparsity) of the
    n channels (ties to the lower index). The authors' code keeps |γ| above the value at that
    index, which prunes one channel more; we prune exactly the stated fraction."""
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, _BN)]
    scales = torch.cat([m.weight.detach().abs().cpu() for _, m in bns])
    order = torch.sort(scales, descending=True, stable=True).indices
    flat = torch.zeros(len(scales), dtype=torch.bool)
    flat[order[:len(scales) - int(len(scales) * sparsity)]] = True
    out, at = {}, 0
    for n, m in bns:
        out[n], at = flat[at:at + m.weight.numel()], at + m.weight.numel()
    return out


def channel_weight_mask(model: nn.Module, keep_bn: dict[str, torch.Tensor]) -> Mask:
    """Weights that remove the dropped channels' filters and the next layer's inputs from them."""
    layer_of = {bn: layer for layer, bn in structured.bn_after(model).items()}  # BN -> the layer it normalizes
    keep = {n: torch.ones(m.weight.shape[0], dtype=torch.bool) for n, m in structured.chain(model)[:-1]}
    for bn, k in keep_bn.items():
        if layer_of.get(bn) in keep:
            keep[layer_of[bn]] = k
    return structured.filter_mask(model, keep)


class EarlyBird(Callback):
    def __init__(self, cfg: dict[str, Any], total: int):
        self.cfg, self.total = cfg, total
        self.masks: list[torch.Tensor] = []   # the last `window` masks, flattened
        self.distances: list[float] = []       # per epoch: the largest distance in the window
        self.found: dict[str, Any] | None = None

    def draw(self, model: nn.Module) -> tuple[torch.Tensor, Mask]:
        """This epoch's mask: flattened (for distances) and as weight masks (for pruning)."""
        if self.cfg["structure"] == "channel":
            keep = channel_keep(model, self.cfg["sparsity"])
            return torch.cat([keep[n] for n in sorted(keep)]), channel_weight_mask(model, keep)
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
    search = train_node(spec, "eb_search", init, spec.train, early_bird={
        "structure": eb.structure, "epsilon": eb.epsilon, "window": eb.window, "sparsity": spec.prune.sparsity,
        "l1": eb.l1 if eb.structure == "channel" else 0.0, **({"ignore": spec.prune.ignore} if spec.prune.ignore else {})})
    start = search if eb.retrain_from == "ticket" else init
    retrain = train_node(spec, "retrain", start, spec.retrain_spec, mask=search, mode="finetune")
    density = 1 - spec.prune.sparsity
    return Plan("early_bird", [dense, Round(1, "early-bird", density, search, retrain,
                                            evaluate_node(spec, retrain, search))])


def label(spec: EarlyBirdSpec, rnd: Round) -> str:
    return f"early-bird ({spec.early_bird.structure})"


PARADIGM = register_paradigm("early_bird", EarlyBirdSpec, plan, label,
                             "You et al.: draw the ticket once the mask stops changing, stop pretraining, retrain",
                             __doc__)
