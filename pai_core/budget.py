"""Liu et al. (ICLR 2019, "Rethinking the value of network pruning")'s Scratch-B: the pruned
architecture trained from a fresh init for the *computation* the dense net's training took,
not its epochs (Scratch-E). The schedule is stretched by dense FLOPs / pruned FLOPs; the
step milestones move with it, to the same fractions of training. Their ImageNet runs cap the
stretch at 2x ("if the pruned model saves more than 2x FLOPs, we just double the epochs"),
their CIFAR runs do not: `cap` is optional. FLOPs are counted on the mask (structured.cost): a
filter mask's equal the physically smaller net's, an unstructured mask counts kept weights."""
from __future__ import annotations

from torch import nn

from pai_core import structured
from pai_core.masks import Mask
from pai_core.specs import TrainSpec


def flops_ratio(model: nn.Module, mask: Mask, in_shape: tuple[int, ...]) -> float:
    """Dense FLOPs / the masked net's FLOPs (2 per multiply-add of a kept weight)."""
    dense, pruned = structured.cost(model, in_shape)["flops"], structured.cost(model, in_shape, mask)["flops"]
    if pruned <= 0:
        raise ValueError("the mask keeps no multiply-add: there is no budget to stretch")
    return dense / pruned


def stretched(spec: TrainSpec, iterations_per_epoch: int, factor: float) -> TrainSpec:
    """`spec` lasting `factor` times as many iterations (at least as many), its step milestones
    at the same fractions of the longer run; warm-up is kept as it is (a fixed start-up)."""
    factor = max(factor, 1.0)
    total = spec.total_iterations(iterations_per_epoch)
    milestones = tuple(round(m * factor) for m in spec.milestone_iterations(iterations_per_epoch))
    return spec.model_copy(update={"epochs": None, "iterations": round(total * factor), "milestones": milestones})


def scratch_b(spec: TrainSpec, iterations_per_epoch: int, model: nn.Module, mask: Mask,
              in_shape: tuple[int, ...], cap: float | None) -> tuple[TrainSpec, dict[str, float]]:
    """The Scratch-B schedule and what it was derived from (recorded in the train info)."""
    ratio = flops_ratio(model, mask, in_shape)
    factor = max(1.0, ratio if cap is None else min(ratio, cap))
    longer = stretched(spec, iterations_per_epoch, factor)
    return longer, {"flops_ratio": ratio, "factor": factor, "iterations": float(longer.iterations),
                    "dense_iterations": float(spec.total_iterations(iterations_per_epoch))}
