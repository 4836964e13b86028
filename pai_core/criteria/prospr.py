"""ProsPr (Alizadeh et al., ICLR 2022, "Prospect pruning"): keep the connections the loss
*after a few steps of training* is most sensitive to, not the loss at the init.

With a mask c on the prunable weights, w_0 = c ⊙ w_init and w_{t+1} = w_t − η ∇L(w_t; D_t),
the score of a connection is |∂L(w_M; D_M)/∂c| at c = 1, back-propagated through all M
updates (second-order terms included: the inner gradients are built with create_graph).
Since c only enters through w_0, ∂L/∂c = ∂L(w_M)/∂w_0 ⊙ w_init; with M = 0 this is SNIP's
|g ⊙ w|. Every parameter trains in the inner loop (biases, BatchNorm's affine, ignored
layers), as in the reference. On an already-masked net (`rounds`) the inner steps keep the
mask (gradients masked, as training does), so a pruned weight scores 0 and stays pruned.

Defaults: M = 3 plain-SGD steps and pruning in a single shot (the paper; also the reference's
`--inner-steps` default), so no `rounds` default as SynFlow/FORCE have; a new training batch for
every step and another for the meta-loss (the paper's formulation, and the default of the
reference's `prospr.prune`); the score is |meta-gradient| of one pass, as in the reference.
The inner lr 0.1 and momentum 0 are mil-ad/prospr's `cli.py` defaults. Its variants, each a
param: `fresh_batches: false` (its CLI's `--new-data-in-inner` default: one batch for every
step and the meta-loss), `momentum` (its README example: lr 0.5, momentum 0.9),
`first_order: true` (the paper's first-order approximation, `--meta-grads-mode first_order`:
inner gradients held constant, so the score is |∂L(w_M)/∂w_M ⊙ w_init|). BatchNorm scores in
train mode (the reference calls `net.train()`); the score stage restores running statistics.
Batches are the spec's training batches (the reference's meta-batch is 128).

Memory: the full meta-gradient keeps all M unrolled steps' graphs (and their double-backward
graphs) alive until the final backward, roughly M + 1 times a training step's activations plus
M copies of the parameters; `first_order` keeps one. The reference moves the net to the CPU for
this; here it runs where the model is.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pai_core.criteria.registry import NoParams, ScoreInputs, register

Batch = tuple[torch.Tensor, torch.Tensor]


class ProsprParams(NoParams):  # frozen, unknown fields refused
    meta_steps: int = Field(3, gt=0, le=100, description="SGD steps M unrolled before the meta-loss (paper: 3)")
    lr: float = Field(0.1, gt=0, le=1000, description="inner SGD learning rate η (reference cli.py: 0.1)")
    momentum: float = Field(0.0, ge=0, lt=1, description="inner SGD momentum (reference default 0)")
    batches: int = Field(1, gt=0, le=10_000, description="training batches averaged per step and in the meta-loss")
    fresh_batches: bool = Field(True, description="new batches every step and for the meta-loss (paper); "
                                                  "false: the same batches throughout (reference CLI)")
    first_order: bool = Field(False, description="hold the inner gradients constant (the paper's first-order "
                                                 "approximation): one graph in memory instead of M")


def _take(batches: Iterable[Batch], groups: int, per_group: int, fresh: bool) -> list[list[Batch]]:
    """`groups` lists of `per_group` batches: successive ones, or the first ones reused."""
    it = iter(batches)
    need = groups * per_group if fresh else per_group
    got = [b for _, b in zip(range(need), it)]
    if len(got) < need:
        raise ValueError(f"prune.params.meta_steps: prospr needs {need} training batches, the data gives {len(got)}")
    return [got[i * per_group:(i + 1) * per_group] for i in range(groups)] if fresh else [got] * groups


def _loss(model: nn.Module, w: Mapping[str, torch.Tensor], buffers: dict[str, torch.Tensor],
          group: list[Batch]) -> torch.Tensor:
    """Mean cross-entropy over the group's batches of the net with parameters `w`."""
    total = sum(F.cross_entropy(torch.func.functional_call(model, (dict(w), buffers), (x,)), y) for x, y in group)
    return total / len(group)


@contextlib.contextmanager
def _seeded_dropout(model: nn.Module, seed: int) -> Iterator[None]:
    """Dropout (WRN's, in train mode) draws from torch's global generator: seed it from the
    score stage's generator for the duration, so the same key gives the same scores."""
    if not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        yield
        return
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def meta_gradients(model: nn.Module, mask: Mapping[str, torch.Tensor], batches: Iterable[Batch], steps: int,
                   lr: float, momentum: float = 0.0, per_step: int = 1, fresh: bool = True,
                   first_order: bool = False) -> dict[str, torch.Tensor]:
    """∂L(w_steps)/∂c at c = 1 for every masked parameter, signed. `steps` = 0 is SNIP's g ⊙ w.
    The model's own parameters and buffers are never written (a functional copy trains)."""
    w0 = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    keep = {n: mask[n].to(device=w0[n].device, dtype=w0[n].dtype) for n in mask}
    groups = _take(batches, steps + 1, per_step, fresh)
    w, velocity = dict(w0), {}
    for t in range(steps):
        names = list(w)
        grads = torch.autograd.grad(_loss(model, w, buffers, groups[t]), [w[n] for n in names],
                                    create_graph=not first_order, allow_unused=True)
        for n, g in zip(names, grads):
            if g is None:  # a parameter the loss does not reach
                continue
            if n in keep:
                g = g * keep[n]  # the current mask holds during the inner steps, as in training
            if momentum:  # torch.optim.SGD's convention: the first buffer is the gradient itself
                g = velocity[n] = g if t == 0 else momentum * velocity[n] + g
            w[n] = w[n] - lr * g
    meta = _loss(model, w, buffers, groups[steps])
    grads = torch.autograd.grad(meta, [w0[n] for n in mask], allow_unused=True)
    return {n: (torch.zeros_like(w0[n]) if g is None else g.detach() * w0[n].detach())
            for n, g in zip(mask, grads)}


@register("prospr", params=ProsprParams, needs_data=True, bn_mode="train",  # mil-ad/prospr: net.train()
          description="Alizadeh et al. 2022: |∂L(w_M)/∂c|, the loss after M SGD steps differentiated "
                      "through them w.r.t. the mask at init")
def prospr(model: nn.Module, mask: Mapping[str, torch.Tensor], inputs: ScoreInputs,
           params: ProsprParams) -> dict[str, torch.Tensor]:
    with _seeded_dropout(model, inputs.generator.initial_seed()):
        meta = meta_gradients(model, mask, inputs.batches, params.meta_steps, params.lr, params.momentum,
                              params.batches, params.fresh_batches, params.first_order)
    return {n: g.abs() for n, g in meta.items()}
