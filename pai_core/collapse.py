"""Layer collapse (Tanaka et al. 2020): a mask that empties a layer, or leaves no path from
the input to the output, gives a network that cannot learn whatever its sparsity says.

The path test is architecture-agnostic: put the mask itself in place of the prunable
weights (1 = kept), zero the biases, make normalisation layers identities, and push an
all-ones input through in float64. Every signal is then non-negative, so the output is
non-zero exactly when some input-to-output path survives, skip connections included.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from pai_core.masks import Mask


class LayerCollapse(ValueError):
    """The mask is refused: `prune.on_collapse: error` and the network collapsed."""


@torch.no_grad()
def collapse_report(model: nn.Module, mask: Mask, in_shape: tuple[int, ...]) -> dict[str, Any]:
    net = copy.deepcopy(model).double().eval()
    for name, p in net.named_parameters():
        if name in mask:
            p.copy_(mask[name].to(p.device, p.dtype))
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)  # norm-layer scales
    for name, b in net.named_buffers():
        if name.endswith("running_mean"):
            b.zero_()
        elif name.endswith("running_var"):
            b.fill_(1.0)
    device = next(net.parameters()).device
    flow = net(torch.ones((1, *in_shape), dtype=torch.float64, device=device)).sum().item()
    empty = [n for n, m in mask.items() if not bool(m.any())]
    return {"empty_layers": empty, "connected": flow > 0, "collapsed": bool(empty) or not flow > 0}


def describe(report: dict[str, Any]) -> str:
    parts = []
    if report["empty_layers"]:
        parts.append("no weight left in " + ", ".join(report["empty_layers"]))
    if not report["connected"]:
        parts.append("no path from input to output")
    return "; ".join(parts)
