"""`pai export` for a stored round: rebuild its masked model from the verified store, export it
in a format (pai_core.export), check the file against the model, write it with manifest.json and
reference.pt. `load_masked_model` is also what `pai speedup` times."""
from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from pai_core.export import (CHECK_BATCH, FORMATS, SPARSE_FORMATS, Check, ExportRefused, RoundNotStored,
                             check_device, check_options, check_outputs, check_supported, conv_default,
                             get_format, layer_plan, load_exported, prunable_layers, save_module, to_format)
from pai_core.masks import Mask, apply_mask, dense_mask
from pai_core.store import atomic_write


@dataclass
class MaskedRound:
    """A stored round rebuilt: `model` has the trained weights with the mask applied (eval mode)."""
    spec: Any
    index: int
    name: str
    model: nn.Module
    mask: Mask
    arch: Any                       # infos.Arch: model name and params, input shape, classes
    data: dict[str, Any]            # the evaluate stage's data fields (dataset, val_size, split_seed)
    keys: dict[str, Any] = field(default_factory=dict)  # weights / mask / evaluate: stage, key, sha256


def resolve_round(plan: Any, round_: int | str | None) -> tuple[int, Any]:
    """(position, Round) of `round_`: its position in the plan (the row of `pai results`, 0 = the
    first) or its name ('dense', 'round 2', ...); None = the last round."""
    rounds = plan.rounds
    if round_ is None:
        return len(rounds) - 1, rounds[-1]
    if isinstance(round_, str) and round_.strip().lstrip("-").isdigit():
        round_ = int(round_)
    if isinstance(round_, int):
        if -len(rounds) <= round_ < len(rounds):
            i = round_ % len(rounds)
            return i, rounds[i]
    else:
        for i, r in enumerate(rounds):
            if r.name == round_:
                return i, r
    names = ", ".join(f"{i} {r.name!r}" for i, r in enumerate(rounds))
    raise ExportRefused(f"no round {round_!r} in this plan; rounds: {names}")


def load_masked_model(spec: Any, round_: int | str | None = None, store: Any = None) -> MaskedRound:
    """The round's trained weights with its mask applied, as the evaluate stage builds them.
    Raises RoundNotStored when its weights or mask are not in the verified store."""
    from pai_core.paradigms import build_plan
    from pai_core.paths import pai_home
    from pai_core.stages.common import build_arch
    from pai_core.store import Store

    store = store if store is not None else Store(pai_home() / "store")
    index, rnd = resolve_round(build_plan(spec), round_)
    needed = [("weights", rnd.trained)] + ([("mask", rnd.mask)] if rnd.mask is not None else [])
    refs = {}
    for role, node in needed:
        ref = store.get(node.stage, node.key)
        if ref is None:
            raise RoundNotStored(f"round {rnd.name!r} of {spec.name} is not stored yet ({role}: {node.stage} "
                                 f"{node.key[:12]}); run it first with `pai run`")
        refs[role] = ref
    payload = store.load(refs["weights"])
    arch = refs["weights"].info.arch
    model = build_arch(arch)
    model.load_state_dict(payload["model"])
    mask = payload.get("mask") or (store.load(refs["mask"])["mask"] if "mask" in refs else dense_mask(model))
    mask = {n: m.bool().cpu() for n, m in mask.items()}
    apply_mask(model, mask)
    evaluated = store.get("evaluate", rnd.evaluate.key)
    keys = {role: {"stage": r.stage, "key": r.key, "sha256": r.sha256} for role, r in refs.items()}
    if payload.get("mask") is not None:  # a mask that moved while training (SET/RigL, gradual, early-bird, supermask)
        keys["mask"] = {**keys["weights"], "from": "the weights' payload"}
    keys.setdefault("mask", None)  # a dense round
    keys["evaluate"] = {"stage": "evaluate", "key": rnd.evaluate.key, "stored": evaluated is not None,
                        **({"test_acc": evaluated.info.test_acc, "sha256": evaluated.sha256} if evaluated else {})}
    return MaskedRound(spec, index, rnd.name, model.eval(), mask, arch, dict(rnd.evaluate.fields["data"]), keys)


def check_inputs(data: dict[str, Any], in_shape: Sequence[int], n: int = CHECK_BATCH) -> tuple[Tensor, str]:
    """The first `n` examples of the dataset's test split (the round's own data), or, if it cannot
    be had on this machine, `n` standard-normal inputs of the model's shape (seed 0)."""
    from pai_core import data as data_lib

    try:
        bundle = data_lib.load(data["dataset"], val_size=data["val_size"], split_seed=data["split_seed"])
        return bundle.test.x[:n].clone(), f"{data['dataset']} test[:{min(n, len(bundle.test))}]"
    except (data_lib.DataUnavailable, OSError) as e:
        gen = torch.Generator().manual_seed(0)
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        x = torch.randn((n, *in_shape), generator=gen)
        return x, f"random normal (seed 0): {data['dataset']} unavailable ({why})"


# --------------------------------------------------------------------- the manifest


class LayerReport(BaseModel):
    param: str
    kind: str
    shape: list[int]
    kept: int
    total: int
    density: float
    sparsity: float
    stored_as: str              # "sparse" | "dense"
    why_dense: str = ""
    stored_values: int | None = None  # entries the sparse tensor holds (bsr: whole blocks)


class Manifest(BaseModel):
    format: str
    file: str
    serialization: str
    loader: str
    block_size: int | None
    sparse_conv: bool  # convs as im2col @ sparse matrix (csr, bsr); see layers[*].stored_as
    fuse_bias: bool | None = None  # semi_structured: each 2:4 layer's bias added in the kernel's epilogue
    spec: dict[str, Any]
    round: dict[str, Any]
    stage_keys: dict[str, Any]
    input_shape: list[int]
    input_dtype: str = "float32"
    num_classes: int
    layers: dict[str, LayerReport]
    density: float
    sparsity: float
    check: Check
    reference: str = "reference.pt"
    device: str
    torch_version: str


def _layer_reports(fmt: str, model: nn.Module, module: nn.Module, mask: Mask,
                   sparse_conv: bool | None) -> dict[str, LayerReport]:
    layers = dict(prunable_layers(model))
    out = {}
    for p in layer_plan(fmt, model, sparse_conv, mask):
        param = f"{p.name}.weight"
        w = layers[p.name].weight
        m = mask.get(param, torch.ones_like(w, dtype=torch.bool))
        kept, total = int(m.sum()), m.numel()
        stored = None  # semi_structured keeps half of each (padded) row, by construction
        if p.stored_as == "sparse" and fmt in SPARSE_FORMATS:
            stored = int(module.get_submodule(p.name).matrix().values().numel())
        out[p.name] = LayerReport(param=param, kind=p.kind, shape=list(w.shape), kept=kept, total=total,
                                  density=kept / total, sparsity=1 - kept / total, stored_as=p.stored_as,
                                  why_dense=p.why_dense, stored_values=stored)
    return out


def export_round(spec: Any, round_: int | str | None, fmt: str, out_dir: str | Path, *,
                 block_size: int | None = None, device: str = "cpu", sparse_conv: bool | None = None,
                 store: Any = None, batch: int = CHECK_BATCH, tune_batches: Sequence[int] = (),
                 fuse_bias: bool | None = None) -> Manifest:
    """Export a stored round as `fmt` into `out_dir`: the model file, `reference.pt` and
    `manifest.json`. The file is loaded back and checked against the masked model first; an
    export that fails the check is removed and refused (ExportRefused). semi_structured is tuned
    for `tune_batches` (default: the check batch) and adds each 2:4 layer's bias in the kernel unless
    `fuse_bias` is False."""
    check_options(fmt, block_size=block_size, tune_batches=tune_batches, fuse_bias=fuse_bias)
    check_device(fmt, device)
    f, dev = get_format(fmt), torch.device(device)
    r = load_masked_model(spec, round_, store)
    check_supported(fmt, r.model, r.mask, block_size=block_size, device=dev, sparse_conv=sparse_conv)
    x, what = check_inputs(r.data, r.arch.in_shape, batch)
    x = x.to(dev)
    with torch.no_grad():
        reference = r.model.to(dev)(x)
    module = to_format(r.model, r.mask, fmt, block_size=block_size, device=dev, sparse_conv=sparse_conv,
                       tune_batches=(tuple(tune_batches) or (int(x.shape[0]),)) if fmt == "semi_structured" else (),
                       fuse_bias=fuse_bias)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f.file
    tmp = out_dir / f".partial-{f.file}"  # same suffix: load_exported picks the loader by it
    try:
        save_module(module, fmt, tmp, x)
        check = check_outputs(load_exported(tmp, dev), reference, x, fmt, what=what)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for other in {g.file for g in FORMATS.values()} - {f.file}:  # an earlier export of another kind
        (out_dir / other).unlink(missing_ok=True)
    tmp.replace(final)
    buf = io.BytesIO()
    torch.save({"inputs": x.cpu(), "outputs": reference.cpu()}, buf)
    atomic_write(out_dir / "reference.pt", buf.getvalue())
    layers = _layer_reports(fmt, r.model, module, r.mask, sparse_conv)
    kept, total = sum(lr.kept for lr in layers.values()), sum(lr.total for lr in layers.values())
    manifest = Manifest(
        format=fmt, file=f.file, serialization=f.serialization, loader=f.loader, block_size=block_size,
        sparse_conv=conv_default(fmt, sparse_conv) and fmt in SPARSE_FORMATS,
        fuse_bias=(fuse_bias is not False) if fmt == "semi_structured" else None, spec=spec.model_dump(mode="json"),
        round={"index": r.index, "name": r.name},
        stage_keys=r.keys, input_shape=list(r.arch.in_shape), num_classes=r.arch.num_classes, layers=layers,
        density=kept / total, sparsity=1 - kept / total, check=check, device=str(dev), torch_version=torch.__version__)
    atomic_write(out_dir / "manifest.json", (json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n").encode())
    return manifest
