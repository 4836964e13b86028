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
"""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor, nn

from pai_core import semi_structured
from pai_core.masks import Mask, apply_mask
from pai_core.sparse_layers import BsrMatrix, CsrMatrix, HalfPrecision, SparseConv2d, SparseLinear

# ---------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Format:
    name: str
    serialization: str  # "torch.export" (.pt2) or "torchscript"
    file: str           # the file name inside the export folder
    atol: float
    rtol: float
    description: str

    @property
    def loader(self) -> str:
        """The line that loads it, with nothing but torch installed."""
        if self.serialization == "torch.export":
            return f"torch.export.load('{self.file}').module()"
        return f"torch.jit.load('{self.file}')"


FP32_ATOL, FP32_RTOL = 1e-4, 1e-4   # fp32 formats: only the summation order differs
FP16_ATOL, FP16_RTOL = 5e-2, 1e-2   # semi_structured runs in float16 (about 3 significant digits)
SEMI_MIN_CAPABILITY = (8, 0)        # 2:4 sparse tensor cores: Ampere and later
CHECK_BATCH = 64

# torch.export cannot hold a sparse CSR/BSR tensor (export: "Sparse CSR tensors do not have
# strides"; strict mode traces a CSR constant but torch.export.save fails on it; building one in
# the graph fails too). TorchScript saves a CSR tensor but not a BSR one, so BSR is stored as its
# crow/col/value tensors and assembled in forward. semi_structured is TorchScript too: torch's
# subclass dispatches to lazily registered Python custom ops, the aten op's fake kernel reads the
# rows from the packed weight's size(0), and padding a dynamic batch to the kernel's multiple of 8
# fails export's guards. docs/export.md has the details.
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("dense", "torch.export", "model.pt2", FP32_ATOL, FP32_RTOL,
           "masked weights folded into the plain net (m ⊙ w), dense kernels"),
    Format("csr", "torchscript", "model.jit.pt", FP32_ATOL, FP32_RTOL,
           "Linear (and Conv2d as im2col matmul) weights as torch.sparse_csr tensors, y = W @ x"),
    Format("bsr", "torchscript", "model.jit.pt", FP32_ATOL, FP32_RTOL,
           "as csr with B×B blocks (torch.sparse_bsr); --block-size must divide every sparse matrix"),
    Format("semi_structured", "torchscript", "model.jit.pt", FP16_ATOL, FP16_RTOL,
           "2:4 Linear weights on cuSPARSELt (CUDA, compute capability >= 8.0), float16"),
    Format("structured", "torch.export", "model.pt2", FP32_ATOL, FP32_RTOL,
           "the physically smaller dense net (whole filters/neurons removed)"),
)}
SPARSE_FORMATS = ("csr", "bsr")


class ExportRefused(ValueError):
    """An export that cannot be made (or was not faithful); the message is one line."""


class RoundNotStored(ExportRefused):
    """The round's weights or mask are not in the verified store yet."""


def get_format(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise ExportRefused(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    return FORMATS[fmt]




# ------------------------------------------------------------- which layer goes how


@dataclass(frozen=True)
class LayerPlan:
    name: str        # module name
    kind: str        # "linear" | "conv"
    stored_as: str   # "sparse" | "dense"
    why_dense: str = ""


def _prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _conv_as_matmul(conv: nn.Conv2d) -> str:
    """Why this conv cannot run as im2col @ sparse matrix, or ''."""
    if conv.groups != 1:
        return "grouped conv"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding {conv.padding!r} ({conv.padding_mode})"
    return ""


def conv_default(fmt: str, sparse_conv: bool | None) -> bool:
    """Whether convs go sparse (im2col @ sparse matrix): by default in csr, not in bsr (an
    im2col matrix's C·kh·kw columns, 9 or 27 for a first 3x3 conv, rarely divide into blocks)."""
    return (fmt == "csr") if sparse_conv is None else sparse_conv


def layer_plan(fmt: str, model: nn.Module, sparse_conv: bool | None = None,
               mask: Mask | None = None) -> list[LayerPlan]:
    """Each Linear/Conv2d of `model` and whether `fmt` stores its weight sparse or dense. Given the
    mask, semi_structured keeps a Linear the mask leaves whole (a classifier head left out of
    pruning, say) dense in float16: 2:4 would change it, and a small layer gains nothing."""
    sparse_conv = conv_default(fmt, sparse_conv)
    out = []
    for name, m in _prunable_layers(model):
        kind = "linear" if isinstance(m, nn.Linear) else "conv"
        why = ""
        if fmt in ("dense", "structured"):
            why = f"{fmt} format"
        elif kind == "conv" and fmt == "semi_structured":
            why = "semi_structured covers Linear layers only"
        elif fmt == "semi_structured" and mask is not None and bool(mask.get(f"{name}.weight",
                                                                             torch.ones(1, dtype=torch.bool)).all()):
            why = "the mask keeps every weight"
        elif kind == "conv" and not sparse_conv:
            why = f"{fmt} keeps convs dense (sparse_conv off)"
        elif kind == "conv":
            why = _conv_as_matmul(m)
        out.append(LayerPlan(name, kind, "dense" if why else "sparse", why))
    return out


def _matrix(layer: nn.Module) -> tuple[int, int]:
    """The weight as the matrix the sparse kernels see: (out, in·kh·kw)."""
    return layer.weight.shape[0], math.prod(layer.weight.shape[1:])


def two_four_problem(mask: Mask, names: Sequence[str]) -> str | None:
    """The first of `names` (weight parameters) whose mask is not 2:4 along rows: some group of 4
    consecutive weights of mask.reshape(out, -1) (a last, shorter group too) keeps more than 2."""
    for name in names:
        m = mask[name].reshape(mask[name].shape[0], -1).to(torch.int64)
        rows, cols = m.shape
        groups = F.pad(m, (0, (-cols) % 4)).reshape(rows, -1, 4).sum(-1)
        bad = (groups > 2).nonzero()
        if len(bad):
            r, g = (int(v) for v in bad[0])
            return (f"{name} is not 2:4 along rows: row {r}, weights {4 * g}..{min(4 * g + 3, cols - 1)} "
                    f"keep {int(groups[r, g])} (at most 2 of every 4 consecutive)")
    return None


def structure_problem(model: nn.Module, mask: Mask) -> str | None:
    """Why `physically_prune` would not reproduce the masked net, or None: torch.fx must trace the
    net into channel groups (channel_graph), and the mask must remove whole groups (filters with
    every input channel they feed and every channel a residual add ties to them), nothing else."""
    from pai_core import channel_graph, structured

    try:
        graph = channel_graph.trace(model)
    except channel_graph.ChannelGraphError as e:
        return f"its channel groups are unknown: {e}"
    names = [f"{n}.weight" for n, _ in structured.chain(model)]
    if missing := [n for n in names if n not in mask]:
        return f"the mask does not cover {missing[0]}"
    kept = structured.kept_filters(model, mask, graph)
    for name, k in kept.items():
        if not bool(k.any()):
            return f"the mask removes every filter of {name}"
    expected = structured.filter_mask(model, kept, graph)
    for n in names:
        m = mask[n].bool()
        if not torch.equal(expected[n], m):
            inside, outside = int((expected[n] & ~m).sum()), int((m & ~expected[n]).sum())
            what = [f"prunes {inside} single weights inside kept filters/neurons"] if inside else []
            what += [f"keeps {outside} weights of removed filters or their dependent channels"] if outside else []
            return (f"{n} {' and '.join(what)}: structured needs a mask that removes whole filters/neurons "
                    f"(use dense, csr or bsr for this one)")
    return None


def check_supported(fmt: str, model: nn.Module, mask: Mask, *, block_size: int | None = None,
                    device: str | torch.device = "cpu", sparse_conv: bool | None = None) -> None:
    """Refuse (ExportRefused, one line) what `fmt` cannot export faithfully; returns None if it can.
    For semi_structured the mask is checked before the device (no device makes a mask 2:4)."""
    check_options(fmt, block_size=block_size)
    plan = layer_plan(fmt, model, sparse_conv, mask)
    layers = dict(_prunable_layers(model))
    if fmt == "semi_structured":
        names = [f"{p.name}.weight" for p in plan if p.stored_as == "sparse"]  # each in the mask, not whole
        if not names:
            raise ExportRefused("semi_structured: the mask keeps every Linear weight, so no layer is 2:4 "
                                "(export a round with an N:M mask: prune.structure nm)")
        if problem := two_four_problem(mask, names):
            raise ExportRefused(f"semi_structured needs a 2:4 mask: {problem}")
        check_device(fmt, device)
    if fmt == "structured" and (problem := structure_problem(model, mask)):
        raise ExportRefused(f"structured: {problem}")
    if fmt == "bsr":
        for p in plan:
            rows, cols = _matrix(layers[p.name])
            if p.stored_as == "sparse" and (rows % block_size or cols % block_size):
                hint = " (or keep convs dense: sparse_conv=False, --dense-conv)" if p.kind == "conv" else ""
                raise ExportRefused(
                    f"bsr block size {block_size} does not divide layer {p.name}'s {rows}x{cols} weight matrix; "
                    f"choose a block size dividing both{hint}")


def check_options(fmt: str, *, block_size: int | None = None, tune_batches: Sequence[int] = ()) -> None:
    """What can be refused from the format, block size and tuning batches alone, before reading anything."""
    get_format(fmt)
    if tune_batches and fmt != "semi_structured":
        raise ExportRefused(f"tuning batch sizes apply to semi_structured only, not {fmt}")
    if bad := [b for b in tune_batches if b < 1]:
        raise ExportRefused(f"a tuning batch size must be >= 1 (got {bad[0]})")
    if fmt == "bsr" and block_size is None:
        raise ExportRefused("bsr needs a block size (--block-size B, B dividing every sparse layer's dimensions)")
    if fmt != "bsr" and block_size is not None:
        raise ExportRefused(f"a block size applies to bsr only, not {fmt}")
    if block_size is not None and block_size < 1:
        raise ExportRefused(f"bsr block size must be >= 1 (got {block_size})")


def check_device(fmt: str, device: str | torch.device) -> None:
    """semi_structured needs a CUDA device of compute capability >= 8.0 with cuSPARSELt."""
    if fmt != "semi_structured":
        return
    need = f"semi_structured needs a CUDA device with compute capability >= {SEMI_MIN_CAPABILITY[0]}." \
           f"{SEMI_MIN_CAPABILITY[1]}"
    if not torch.cuda.is_available():
        raise ExportRefused(f"{need}; torch sees no CUDA device")
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ExportRefused(f"{need}; the export device is {dev} (use device cuda)")
    cap = torch.cuda.get_device_capability(dev)
    if tuple(cap) < SEMI_MIN_CAPABILITY:
        raise ExportRefused(f"{need}; {dev} ({torch.cuda.get_device_name(dev)}) is {cap[0]}.{cap[1]}")
    if not torch.backends.cusparselt.is_available():
        raise ExportRefused(f"{need} and cuSPARSELt, which this torch build lacks")


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


def _two_four_layer(layer: nn.Linear) -> nn.Module:
    try:
        return semi_structured.layer(layer)
    except semi_structured.TwoFourRefused as e:
        raise ExportRefused(str(e)) from e


@torch.no_grad()
def to_format(model: nn.Module, mask: Mask, fmt: str, *, block_size: int | None = None,
              device: str | torch.device = "cpu", sparse_conv: bool | None = None,
              tune_batches: Sequence[int] = ()) -> nn.Module:
    """The exportable module of `fmt` for `model` under `mask`, on `device`, in eval mode. It
    computes what the masked model computes (within the format's tolerance). Refuses
    (ExportRefused) what the format cannot express. Nothing is written. `sparse_conv=False`
    keeps convs dense in csr, True makes them sparse in bsr. semi_structured searches
    cuSPARSELt's fastest algorithm for each batch size in `tune_batches` (others use its default)."""
    check_options(fmt, block_size=block_size, tune_batches=tune_batches)
    check_supported(fmt, model, mask, block_size=block_size, device=device, sparse_conv=sparse_conv)
    with _quiet():
        return _to_format(model, mask, fmt, block_size, device, sparse_conv, tune_batches)


def _to_format(model: nn.Module, mask: Mask, fmt: str, block_size: int | None, device: str | torch.device,
               sparse_conv: bool | None, tune_batches: Sequence[int] = ()) -> nn.Module:
    masked = masked_copy(model, mask).to(device)
    if fmt == "dense":
        return masked
    if fmt == "structured":
        from pai_core.structured import physically_prune

        return physically_prune(masked, mask).eval()
    layers = dict(_prunable_layers(masked))
    for p in layer_plan(fmt, masked, sparse_conv, mask):
        if p.stored_as == "sparse":
            layer = layers[p.name]
            new = (_two_four_layer(layer) if fmt == "semi_structured"
                   else _sparse_layer(fmt, layer, mask.get(f"{p.name}.weight", torch.ones_like(layer.weight)),
                                      block_size))
            _replace(masked, p.name, new)
    if fmt == "semi_structured":
        semi_structured.tune(masked, tune_batches)
        return HalfPrecision(masked.half()).eval()
    return masked.eval()


def build(fmt: str, model: nn.Module, mask: Mask, example_input: Tensor | None = None, *,
          block_size: int | None = None, device: str | torch.device = "cpu",
          sparse_conv: bool | None = None, tune_batches: Sequence[int] | None = None) -> nn.Module:
    """`to_format` for benchmarks: the module of `fmt`, with nothing written. Given an
    `example_input`, its outputs are first checked against the masked model's (ExportRefused
    past the format's tolerance), so what is timed is known to compute the same thing."""
    if tune_batches is None:  # semi_structured: tuned for the batch it is checked on
        tune_batches = () if example_input is None or fmt != "semi_structured" else (int(example_input.shape[0]),)
    module = to_format(model, mask, fmt, block_size=block_size, device=device, sparse_conv=sparse_conv,
                       tune_batches=tune_batches)
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
