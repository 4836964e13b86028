"""SET and RigL in the registry. Their rule lives in `pai_core/dynamic.py`; their options
are the `dynamic.*` fields of the spec (update_interval, drop_fraction, end_fraction,
anneal, grow_init, regrow_dropped, skip_step_on_update), as before the registry, so their
stage keys are unchanged."""
from __future__ import annotations

from typing import Any

from pai_core.callbacks import MaskUpdate
from pai_core.dynamic import DynamicSparsity
from pai_core.dynamic_methods.registry import register


def _build(d: dict[str, Any], total: int, seed: int) -> MaskUpdate:
    return MaskUpdate(DynamicSparsity(d["method"], d["update_interval"], d["drop_fraction"],
                                      int(d["end_fraction"] * total), seed, anneal=d["anneal"],
                                      grow_init=d["grow_init"], regrow_dropped=d["regrow_dropped"],
                                      skip_step_on_update=d["skip_step_on_update"]))


register("set", label="SET", top_level=True,
         description="Mocanu et al. 2018: drop the smallest weights, regrow as many at random")(_build)
register("rigl", label="RigL", top_level=True,
         description="Evci et al. 2020: drop the smallest weights, regrow by dense-gradient magnitude")(_build)
