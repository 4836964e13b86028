"""Export a finished round as a model that runs without pai-flow: masked weights folded into a
plain net (`dense`), sparse matrices (`csr`, `bsr`), 2:4 semi-structured weights on a GPU
(`semi_structured`), or the physically smaller dense net of filter pruning (`structured`).

Each export is one self-contained file (a `torch.export` program or a TorchScript archive,
whichever torch can serialize for that format, see `FORMATS`) plus `manifest.json` and
`reference.pt` (the check inputs and the masked model's outputs on them). Before an export is
kept it is loaded back as a user would load it, and its outputs are compared with the masked
model's within the format's tolerance. What a format cannot express is refused by name
(`ExportRefused`, one line) before any work; an export that fails the check is deleted and refused.

For notebooks and benchmarks: `build` / `to_format` (the exportable module of a format, in
memory, no files), `save_module` / `load_exported`, `check_outputs`. A stored round in, files
out (as `pai export` does): pai_core.export_round. The layers themselves: pai_core.sparse_layers.
The formats: pai_core.export_formats; what each can express, and the refusals: pai_core.export_checks.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from pai_core import semi_structured
from pai_core.export_checks import (LayerPlan, check_device, check_options, check_supported, conv_default,
                                    layer_plan, prunable_layers, structure_problem, two_four_problem)
from pai_core.export_formats import (CHECK_BATCH, FORMATS, SPARSE_FORMATS, ExportRefused, Format, RoundNotStored,
                                     get_format)
from pai_core.masks import Mask, apply_mask
from pai_core.sparse_layers import BsrMatrix, CsrMatrix, HalfPrecision, SparseConv2d, SparseLinear

# The public surface: the formats and refusals live in their own modules, and are named here too
# so that `from pai_core.export import ...` stays the one import a notebook or a caller needs.
__all__ = ["CHECK_BATCH", "FORMATS", "SPARSE_FORMATS", "Check", "ExportRefused", "Format", "LayerPlan",
           "RoundNotStored", "build", "check_device", "check_options", "check_outputs", "check_supported",
           "conv_default", "get_format", "layer_plan", "load_exported", "masked_copy", "prunable_layers",
           "save_module", "structure_problem", "to_format", "two_four_problem"]


# ------------------------------------------------------------------- building modules


def masked_copy(model: nn.Module, mask: Mask) -> nn.Module:
    """m ⊙ w folded into a copy of `model`, in eval mode (the reference every export must match)."""
    out = copy.deepcopy(model)
    apply_mask(out, mask)
    return out.eval()


def _csr(w: Tensor, keep: Tensor) -> Tensor:
    """Exactly the kept entries (a kept weight that happens to be 0 stays stored)."""
    crow = torch.zeros(w.shape[0] + 1, dtype=torch.int64, device=w.device)
    crow[1:] = keep.sum(1).cumsum(0)
    return torch.sparse_csr_tensor(crow, keep.nonzero()[:, 1], w[keep], w.shape)


def _bsr(w: Tensor, keep: Tensor, b: int) -> Tensor:
    """Every b×b block holding a kept weight, stored whole (its pruned entries as zeros)."""
    rows, cols = w.shape
    blocks = (w * keep).reshape(rows // b, b, cols // b, b).transpose(1, 2)      # R/b, C/b, b, b
    kept = keep.reshape(rows // b, b, cols // b, b).transpose(1, 2).flatten(2).any(-1)
    crow = torch.zeros(rows // b + 1, dtype=torch.int64, device=w.device)
    crow[1:] = kept.sum(1).cumsum(0)
    return torch.sparse_bsr_tensor(crow, kept.nonzero()[:, 1], blocks[kept].contiguous(), w.shape)


def _replace(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _sparse_layer(fmt: str, layer: nn.Module, keep: Tensor, block_size: int | None) -> nn.Module:
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    k = keep.to(w.device).bool().reshape(w.shape)
    matrix = CsrMatrix(_csr(w, k)) if fmt == "csr" else BsrMatrix(_bsr(w, k, block_size))
    bias = None if layer.bias is None else layer.bias.detach().clone()
    if isinstance(layer, nn.Linear):
        return SparseLinear(matrix, bias, layer.in_features, layer.out_features)
    return SparseConv2d(matrix, bias, layer)


def _two_four_layer(layer: nn.Linear, fuse_bias: bool) -> nn.Module:
    try:
        return semi_structured.layer(layer, fuse_bias=fuse_bias)
    except semi_structured.TwoFourRefused as e:
        raise ExportRefused(str(e)) from e


@torch.no_grad()
def to_format(model: nn.Module, mask: Mask, fmt: str, *, block_size: int | None = None,
              device: str | torch.device = "cpu", sparse_conv: bool | None = None,
              tune_batches: Sequence[int] = (), fuse_bias: bool | None = None) -> nn.Module:
    """The exportable module of `fmt` for `model` under `mask`, on `device`, in eval mode. It
    computes what the masked model computes (within the format's tolerance). Refuses
    (ExportRefused) what the format cannot express. Nothing is written. `sparse_conv=False`
    keeps convs dense in csr, True makes them sparse in bsr. semi_structured searches
    cuSPARSELt's fastest algorithm for each batch size in `tune_batches` (others use its default);
    `fuse_bias` (semi_structured; default yes) hands each 2:4 layer's bias to the kernel's epilogue
    (SemiStructuredLinear) rather than adding it after the product."""
    check_options(fmt, block_size=block_size, tune_batches=tune_batches, fuse_bias=fuse_bias)
    check_supported(fmt, model, mask, block_size=block_size, device=device, sparse_conv=sparse_conv)
    with _quiet():
        return _to_format(model, mask, fmt, block_size, device, sparse_conv, tune_batches, fuse_bias)


def _to_format(model: nn.Module, mask: Mask, fmt: str, block_size: int | None, device: str | torch.device,
               sparse_conv: bool | None, tune_batches: Sequence[int] = (), fuse_bias: bool | None = None
               ) -> nn.Module:
    masked = masked_copy(model, mask).to(device)
    if fmt == "dense":
        return masked
    if fmt == "structured":
        from pai_core.structured import physically_prune

        return physically_prune(masked, mask).eval()
    layers = dict(prunable_layers(masked))
    for p in layer_plan(fmt, masked, sparse_conv, mask):
        if p.stored_as == "sparse":
            layer = layers[p.name]
            new = (_two_four_layer(layer, fuse_bias is not False) if fmt == "semi_structured"
                   else _sparse_layer(fmt, layer, mask.get(f"{p.name}.weight", torch.ones_like(layer.weight)),
                                      block_size))
            _replace(masked, p.name, new)
    if fmt == "semi_structured":
        semi_structured.tune(masked, tune_batches)
        return HalfPrecision(masked.half()).eval()
    return masked.eval()


def build(fmt: str, model: nn.Module, mask: Mask, example_input: Tensor | None = None, *,
          block_size: int | None = None, device: str | torch.device = "cpu",
          sparse_conv: bool | None = None, tune_batches: Sequence[int] | None = None,
          fuse_bias: bool | None = None) -> nn.Module:
    """`to_format` for benchmarks: the module of `fmt`, with nothing written. Given an
    `example_input`, its outputs are first checked against the masked model's (ExportRefused
    past the format's tolerance), so what is timed is known to compute the same thing."""
    if tune_batches is None:  # semi_structured: tuned for the batch it is checked on
        tune_batches = () if example_input is None or fmt != "semi_structured" else (int(example_input.shape[0]),)
    module = to_format(model, mask, fmt, block_size=block_size, device=device, sparse_conv=sparse_conv,
                       tune_batches=tune_batches, fuse_bias=fuse_bias)
    if example_input is not None:
        reference = masked_copy(model, mask).to(device)
        with torch.no_grad():
            check_outputs(module, reference(example_input.to(device)), example_input.to(device), fmt)
    return module


# ----------------------------------------------------------------- save, load, check


@contextmanager
def _quiet() -> Iterator[None]:
    """TorchScript's deprecation notices and the sparse 'beta' notices, once per call, are noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*is deprecated\. Please switch to", category=Warning)
        warnings.filterwarnings("ignore", message=r"Sparse (CSR|BSR|invariant).*", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*Sparse invariant checks are implicitly disabled.*")
        yield


def save_module(module: nn.Module, fmt: str, path: str | Path, example_input: Tensor) -> Path:
    """Serialize `module` (from `to_format`) as `fmt` does: torch.export with a dynamic batch
    dimension, or TorchScript. Returns the path written."""
    f, path = get_format(fmt), Path(path)
    with _quiet(), torch.no_grad():
        if f.serialization == "torch.export":
            batch = torch.export.Dim("batch", min=1, max=1 << 30)
            program = torch.export.export(module, (example_input,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(path))
        else:
            torch.jit.save(torch.jit.script(module), str(path))
    return path


def load_exported(path: str | Path, device: str | torch.device | None = None) -> Any:
    """Load an exported file as a user would (a callable module): .pt2 by torch.export, else TorchScript."""
    with _quiet():
        if str(path).endswith(".pt2"):
            return torch.export.load(str(path)).module()
        module = torch.jit.load(str(path), map_location=device)
    semi_structured.retarget(module)
    return module


class Check(BaseModel):
    passed: bool
    max_abs_diff: float
    atol: float
    rtol: float
    batch: int
    inputs: str = ""
    device: str = "cpu"

    def describe(self) -> str:
        return f"max |Δ| {self.max_abs_diff:.3g} (tolerance atol {self.atol:g} + rtol {self.rtol:g}·|y|)"


def check_outputs(module: Any, reference: Tensor, inputs: Tensor, fmt: str, *, what: str = "",
                  raise_on_failure: bool = True) -> Check:
    """Run `module` on `inputs` and compare with `reference` (the masked model's outputs):
    |y − ref| <= atol + rtol·|ref| everywhere, with the format's tolerance."""
    f = get_format(fmt)
    with torch.no_grad():
        out = module(inputs)
    out, ref = out.detach().float().cpu(), reference.detach().float().cpu()
    if out.shape != ref.shape:
        raise ExportRefused(f"{fmt} export gives outputs of shape {tuple(out.shape)}, the masked model "
                            f"{tuple(ref.shape)}")
    diff = (out - ref).abs()
    ok = bool(torch.isfinite(out).all()) and bool((diff <= f.atol + f.rtol * ref.abs()).all())
    check = Check(passed=ok, max_abs_diff=float(diff.max()) if diff.numel() else 0.0, atol=f.atol, rtol=f.rtol,
                  batch=int(inputs.shape[0]), inputs=what, device=str(inputs.device))
    if not ok and raise_on_failure:
        raise ExportRefused(f"{fmt} export does not reproduce the masked model: {check.describe()}"
                            + (f" on {what}" if what else ""))
    return check
