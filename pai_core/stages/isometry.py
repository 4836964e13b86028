"""isometry: the kept init weights re-initialised towards approximate dynamical isometry
(Lee et al. 2020), between the mask at init and training (`prune.init_after_mask`)."""
from __future__ import annotations

from collections.abc import Mapping

from pai_core.infos import IsometryInfo
from pai_core.isometry import approximate_isometry
from pai_core.plan import Node
from pai_core.stages.registry import Runtime, stage
from pai_core.store import Ref


@stage("isometry", salt=1, info=IsometryInfo)
def isometry_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, IsometryInfo]:
    """Orthogonalise each masked layer of the init: min ||(M⊙W)(M⊙W)ᵀ − I||_F by SGD."""
    weights = inputs["weights"]
    state = dict(rt.store.load(weights)["model"])
    mask = rt.store.load(inputs["mask"])["mask"]
    new, report = approximate_isometry({n: state[n] for n in mask}, mask, node.fields["steps"], node.fields["lr"])
    state.update(new)
    return {"model": state}, IsometryInfo(arch=weights.info.arch, iteration=0, singular_values=report)
