"""|w|: the LTH / PaT criterion (Han et al. 2015; Frankle & Carbin 2019)."""
from __future__ import annotations

import torch

from pai_core.criteria.registry import register


@register("magnitude", description="|w|: the classic (Han et al.; LTH's IMP)")
def magnitude(model, mask, inputs, params) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    return {n: named[n].detach().abs().clone() for n in mask}
