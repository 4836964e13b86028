"""Inference FLOPs of a masked net, counted on its Conv/Linear weights (2 per multiply-add of a
kept weight, biases and BatchNorm left out, as the pruning papers count them). A weight of a
conv is used at every output position, so equal sparsities cost differently when the layers'
densities differ: ERK keeps the early convs denser than global magnitude does."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

LAYERS = (nn.Conv2d, nn.Linear)


def layer_work(model: nn.Module, in_shape: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """Per Conv/Linear layer: its weight count and how many times each weight is used on one
    input (a conv's output positions, 1 for a Linear). One forward of a zero input, which the
    meta device does without memory or time."""
    sizes: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: sizes.__setitem__(n, o[0, 0].numel()))
             for n, m in _layers(model)]
    was = model.training
    model.eval()
    try:
        model(torch.zeros((1, *in_shape), device=next(model.parameters()).device))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return {n: (m.weight.numel(), sizes[n] if isinstance(m, nn.Conv2d) else 1) for n, m in _layers(model)}


def share(model: nn.Module, in_shape: tuple[int, ...], densities: dict[str, float]) -> float:
    """The masked net's FLOPs over the dense net's, from each weight's density ({"conv1.weight":
    0.2, ...}; a layer not named counts whole). The meta-device net serves: no weights are read."""
    return _share(layer_work(model, in_shape), densities)


_WORK: dict[tuple[Any, ...], dict[str, tuple[int, int]]] = {}  # per net and input: a report asks per round


def spec_share(spec: Any, densities: dict[str, float]) -> float:
    """`share` for a spec's net (built on the meta device) at a round's per-layer densities; NaN
    for a net the meta device cannot run, so a report or table shows no FLOPs but the rest."""
    from pai_core.prune_checks import meta_model  # spec-level; this module stays a leaf

    info = spec.data.info
    key = (spec.model.name, tuple(sorted(spec.model.params.items())), tuple(info.in_shape), info.num_classes)
    try:
        if key not in _WORK:
            _WORK[key] = layer_work(meta_model(spec), tuple(info.in_shape))
    except (RuntimeError, NotImplementedError, ValueError):
        return math.nan
    return _share(_WORK[key], densities)


def _share(work: dict[str, tuple[int, int]], densities: dict[str, float]) -> float:
    dense = sum(numel * uses for numel, uses in work.values())
    kept = sum(densities.get(f"{n}.weight", 1.0) * numel * uses for n, (numel, uses) in work.items())
    return kept / dense if dense else math.nan


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LAYERS)]
