"""What each export format can express, decided before any work: which Linear/Conv2d layers a
format stores sparse (and why the others stay dense), and the refusals, each one line naming
the layer and what to do instead (a mask that is not 2:4, a block size that does not divide a
layer, a mask that removes more than whole filters, no CUDA device of compute capability 8.0)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pai_core.export_formats import SEMI_MIN_CAPABILITY, ExportRefused, get_format
from pai_core.masks import Mask


@dataclass(frozen=True)
class LayerPlan:
    name: str        # module name
    kind: str        # "linear" | "conv"
    stored_as: str   # "sparse" | "dense"
    why_dense: str = ""


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def conv_as_matmul(conv: nn.Conv2d) -> str:
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
    for name, m in prunable_layers(model):
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
            why = conv_as_matmul(m)
        out.append(LayerPlan(name, kind, "dense" if why else "sparse", why))
    return out


def matrix_shape(layer: nn.Module) -> tuple[int, int]:
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
    layers = dict(prunable_layers(model))
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
            rows, cols = matrix_shape(layers[p.name])
            if p.stored_as == "sparse" and (rows % block_size or cols % block_size):
                hint = " (or keep convs dense: sparse_conv=False, --dense-conv)" if p.kind == "conv" else ""
                raise ExportRefused(
                    f"bsr block size {block_size} does not divide layer {p.name}'s {rows}x{cols} weight matrix; "
                    f"choose a block size dividing both{hint}")


def check_options(fmt: str, *, block_size: int | None = None, tune_batches: Sequence[int] = (),
                  fuse_bias: bool | None = None) -> None:
    """What can be refused from the format, block size and tuning batches alone, before reading anything."""
    get_format(fmt)
    if fuse_bias is not None and fmt != "semi_structured":
        raise ExportRefused(f"fusing the bias into the kernel or not (--fuse-bias/--separate-bias) applies to "
                            f"semi_structured only, not {fmt}")
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
