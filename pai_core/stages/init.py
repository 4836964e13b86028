"""init: the registered model built from the seed, with its paper's initialisation."""
from __future__ import annotations

from collections.abc import Mapping

from pai_core.infos import Arch, InitInfo
from pai_core.plan import Node
from pai_core.stages.common import build_arch
from pai_core.stages.registry import Runtime, stage
from pai_core.store import Ref


@stage("init", salt=1, info=InitInfo)
def init_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, InitInfo]:
    """The initial weights w^(0)."""
    f = node.fields
    arch = Arch(model=f["model"], in_shape=f["in_shape"], num_classes=f["num_classes"])
    return {"model": build_arch(arch, seed=f["seed"]).state_dict()}, InitInfo(arch=arch, iteration=0)
