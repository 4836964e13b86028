"""Masks: which prunable weights survive, and keeping the dead ones dead.

A mask is a plain `dict[param_name, bool tensor]` over the prunable parameters, so it is
saved with `torch.save`, diffed, and logged without any custom type. Enforcement zeroes
the gradient before the optimizer step and the weight after it: momentum, Adam state and
weight decay then can never revive a pruned weight, and `state_dict` keys stay those of
the plain model (no reparametrisation).
"""
from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

Mask = dict[str, torch.Tensor]

PRUNABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_names(model: nn.Module, include_biases: bool = False) -> list[str]:
    """Weights of Conv and Linear layers (and their biases if asked), in module order."""
    names = []
    for mod_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_LAYERS):
            prefix = f"{mod_name}." if mod_name else ""
            names.append(prefix + "weight")
            if include_biases and module.bias is not None:
                names.append(prefix + "bias")
    return names


def is_ignored(name: str, ignore: Sequence[str]) -> bool:
    """`name` matches one of the `prune.ignore` patterns (fnmatch: `fc.weight`, `conv1.*`)."""
    return any(fnmatchcase(name, pattern) for pattern in ignore)


def dense_mask(model: nn.Module, include_biases: bool = False, ignore: Sequence[str] = ()) -> Mask:
    """All-kept masks over the prunable parameters, less those `ignore` names: a parameter
    without a mask is never pruned, and the sparsity counts the masked ones only."""
    params = dict(model.named_parameters())
    return {n: torch.ones_like(params[n], dtype=torch.bool) for n in prunable_names(model, include_biases)
            if not is_ignored(n, ignore)}


def apply_mask(model: nn.Module, mask: Mask | None) -> None:
    """w' = m ⊙ w, in place."""
    if not mask:
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in mask.items():
            params[name].mul_(m.to(params[name].device, params[name].dtype))


class MaskEnforcer:
    """Holds (param, float mask) pairs on the right device so each step costs two multiplies."""

    def __init__(self, model: nn.Module, mask: Mask | None):
        params = dict(model.named_parameters())
        self.pairs = [
            (params[n], m.to(params[n].device, params[n].dtype)) for n, m in (mask or {}).items()
            if not bool(m.all())
        ]

    def before_step(self) -> None:
        for p, m in self.pairs:
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def after_step(self) -> None:
        for p, m in self.pairs:
            p.mul_(m)


def density_report(mask: Mask) -> dict[str, dict[str, float | int]]:
    """Per layer and in total: how many weights are kept, of how many, and the density."""
    report: dict[str, dict[str, float | int]] = {}
    kept_all = total_all = 0
    for name, m in mask.items():
        kept, total = int(m.sum()), m.numel()
        report[name] = {"kept": kept, "total": total, "density": kept / total}
        kept_all, total_all = kept_all + kept, total_all + total
    report["total"] = {"kept": kept_all, "total": total_all, "density": kept_all / max(total_all, 1)}
    return report


def sparsity(mask: Mask) -> float:
    total = sum(m.numel() for m in mask.values())
    return 1 - sum(int(m.sum()) for m in mask.values()) / total
