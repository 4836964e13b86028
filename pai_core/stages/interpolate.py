"""interpolate: the error and loss on the straight line between two trained copies of one
network (pai_core.interpolation), and their barriers: Frankle et al. (2020)'s instability."""
from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch

from pai_core import interpolation
from pai_core.infos import InterpolationInfo
from pai_core.plan import Node
from pai_core.stages.common import batch_stream, bundle_for, model_from
from pai_core.stages.registry import Runtime, stage
from pai_core.store import Ref
from pai_core.training import evaluate


@stage("interpolate", salt=1, info=InterpolationInfo)
def interpolate_stage(node: Node, inputs: Mapping[str, Ref], rt: Runtime) -> tuple[dict, InterpolationInfo]:
    """Evaluate (1 − α)·w_a + α·w_b on each split at `alphas` evenly spaced α, masked by `mask`."""
    f, a_ref, b_ref = node.fields, inputs["a"], inputs["b"]
    a, b = rt.store.load(a_ref)["model"], rt.store.load(b_ref)["model"]
    model = model_from(a_ref, {"model": a}, rt)
    mask = rt.store.load(inputs["mask"])["mask"] if "mask" in inputs else None
    bundle = bundle_for(f["data"], rt)

    def measure(m: torch.nn.Module) -> dict[str, float]:
        row = {}
        for split in f["splits"]:
            r = evaluate(m, getattr(bundle, split))
            row |= {f"{split}_err": 1.0 - r["acc"], f"{split}_loss": r["loss"]}
        return row

    bn = f.get("bn", {"stats": "interpolate"})
    batches = None
    if bn["stats"] == "recompute":  # the same first training batches at every α
        batches = lambda: itertools.islice(batch_stream(bn["data"], rt), bn["batches"])  # noqa: E731
    rows = interpolation.path(model, a, b, interpolation.alphas(f["alphas"]), measure, mask=mask,
                              bn_stats=bn["stats"], bn_batches=batches)
    params = [n for n, _ in model.named_parameters()]
    diff = torch.sqrt(sum(((a[n].double() - b[n].double()) ** 2).sum() for n in params)).item()
    norm = torch.sqrt(sum((a[n].double() ** 2).sum() for n in params)).item()
    info = InterpolationInfo(
        splits=list(f["splits"]), path=rows, bn_stats=bn["stats"], distance=diff,
        relative_distance=diff / max(norm, 1e-30),
        instability={s: interpolation.barrier([r[f"{s}_err"] for r in rows]) for s in f["splits"]},
        loss_barrier={s: interpolation.barrier([r[f"{s}_loss"] for r in rows]) for s in f["splits"]})
    return {}, info
