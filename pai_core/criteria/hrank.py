"""HRank (Lin et al., CVPR 2020): a filter's importance is the average rank of its feature map.

The paper observes that the average rank of the map a filter produces is nearly the same
whichever batches it is estimated on, so a few batches suffice, and that a low-rank map
carries less information (it can be rebuilt from fewer vectors): its filter goes first.

Score of output unit c of a layer: the mean over the images of `params.batches` training
batches (epoch-0 order, augmented as training sees them) of rank(relu(y_c)), y_c the unit's
H×W map after its BatchNorm (`structured.bn_after`) or, where none follows, after the layer.
The ReLU is applied here to the hooked tensor, so functional or shared ReLUs need no module
of their own. Ranks are `torch.linalg.matrix_rank` of the maps in their own dtype (float32)
with its default tolerance (σ > max(H, W)·eps·σ_max, that of the reference's
`torch.matrix_rank`), all images and channels of a batch at once, summed in float64. One
forward pass scores every layer. One score per unit, given to every weight of the unit (and
its bias, if pruned): `structure: filter` reads it exactly with `filter_norm: max`.

Defaults, from the reference (lmbxmu/HRank `rank_generation.py`): `batches` 5 (its `--limit`;
at its batch size 128, 640 images), BatchNorm in eval mode (`net.eval()` in its `test()`),
training-set batches, maps taken at the ReLU after each conv's BatchNorm. Its `mask.py` then
removes the lowest-rank filters of each conv at per-layer rates: `scope: layerwise`, with
`prune.layer_density` for rates that differ by layer.

Departures from the reference:
- Its `main.py` prunes one conv at a time, fine-tuning 15 epochs after each (SGD lr 0.01, ×0.1
  at epochs 5 and 10, weight decay 5e-4); a pai-flow round prunes every layer at once.
- ResNet blocks: the reference ranks a block's second conv by the ReLU after the residual
  add (`relu2` of `resnet_cifar.py`; ResNet-50's stem by the max-pool); here it is the ReLU
  of that conv's own BatchNorm output, before the add, so the score is the unit's alone.
- A ReLU is applied even where the net has none after the unit (a linear bottleneck).
- Linear layers (the reference prunes convs only): an output unit's "map" is 1×1, whose rank
  is 1 when the unit is positive after the ReLU and 0 otherwise, so its score is the fraction
  of images on which it fires (the complement of Hu et al.'s APoZ). The same formula, so nets
  with hidden fc layers need no `prune.ignore`; but these scores are at most 1, below most
  conv ranks, so compare them within a layer (`scope: layerwise`), not across layers.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from pai_core import structured
from pai_core.criteria.registry import NoParams, ScoreInputs, register
from pai_core.masks import Mask


class HRankParams(NoParams):  # frozen, unknown fields refused
    batches: int = Field(5, gt=0, le=10_000, description="training batches whose images' feature-map ranks are "
                                                          "averaged (the reference's --limit, 5)")


@register("hrank", whole_units=True, params=HRankParams, needs_data=True, bn_mode="eval",
          description="Lin et al. 2020: a filter's average feature-map rank after its BatchNorm and ReLU over the "
                      "images of a few training batches (structure filter; Linear units: the fraction active)")
def hrank(model: nn.Module, mask: Mask, inputs: ScoreInputs, params: HRankParams) -> dict[str, torch.Tensor]:
    modules, named = dict(model.named_modules()), dict(model.named_parameters())
    layers = list(dict.fromkeys(n.rpartition(".")[0] for n in mask))
    bn = structured.bn_after(model)
    total: dict[str, torch.Tensor] = {}
    images = dict.fromkeys(layers, 0)
    hooks = []
    try:
        for layer in layers:
            hooked = modules[bn[layer]] if layer in bn else modules[layer]
            hooks.append(hooked.register_forward_hook(_accumulate(layer, isinstance(hooked, nn.Linear),
                                                                  total, images)))
        with torch.no_grad():
            for _, (x, _y) in zip(range(params.batches), inputs.batches):
                model(x)
    finally:
        for h in hooks:
            h.remove()
    if missing := [n for n in layers if not images[n]]:
        raise ValueError(f"hrank: no feature map reached {', '.join(missing)} (no batches, or the layer never ran)")
    out = {}
    for name in mask:
        p, layer = named[name], name.rpartition(".")[0]
        unit = (total[layer] / images[layer]).to(p.dtype)
        out[name] = unit.reshape(-1, *[1] * (p.dim() - 1)).expand_as(p).clone()
    return out


def map_ranks(y: torch.Tensor) -> torch.Tensor:
    """(N, C) ranks of relu(y)'s per-unit maps; y is (N, C, H, W), (N, C, L) or (N, C)
    (a length-L map is 1×L, a unit without one 1×1)."""
    if not 2 <= y.dim() <= 4:
        raise ValueError(f"hrank ranks 2-D feature maps; got an output of shape {tuple(y.shape)}")
    maps = y.reshape(*y.shape[:2], *[1] * (4 - y.dim()), *y.shape[2:]).relu()
    if maps.dtype not in (torch.float32, torch.float64):  # no SVD in half precision
        maps = maps.float()
    return torch.linalg.matrix_rank(maps)


def _accumulate(layer: str, channels_last: bool, total: dict[str, torch.Tensor],
                images: dict[str, int]) -> Callable[[nn.Module, Any, torch.Tensor], None]:
    """A forward hook adding the ranks of `layer`'s unit maps in this output to `total`."""
    def hook(module: nn.Module, args: Any, y: torch.Tensor) -> None:
        if channels_last:  # a Linear's (N, ..., C): the units first, the rest their map
            y = y.movedim(-1, 1).flatten(2) if y.dim() > 2 else y
        ranks = map_ranks(y.detach()).sum(0, dtype=torch.float64)
        total[layer] = total[layer] + ranks if layer in total else ranks
        images[layer] += y.shape[0]
    return hook
