"""2:4 layers on cuSPARSELt: building one from a masked Linear, and choosing its algorithm.

torch's `_cslt_sparse_mm` runs cuSPARSELt's default algorithm (id 0) unless told otherwise, and
the default is often far from the fastest: on an H200, a 4096 x 4096 layer at batch 1024 took
0.066 ms with id 0 and 0.036 ms with the searched id 22, replayed from a CUDA graph
(benchmarks/two_four_paths.py). The search (`_cslt_sparse_mm_search`) times every algorithm for
one call on one GPU, so an export searches once per batch size and operand layout it is tuned
for and stores the ids with the GPU they hold on; an archive loaded on another GPU falls back to
id 0 rather than run an id that may not exist there.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pai_core.sparse_layers import SemiStructuredLinear


class TwoFourRefused(ValueError):
    """What cuSPARSELt cannot run (pai_core.export re-raises it as ExportRefused)."""


def layer(linear: nn.Linear, fuse_bias: bool = True) -> SemiStructuredLinear:
    """`linear` (its weight already 2:4 along rows) compressed for cuSPARSELt in float16; rows and
    columns zero-padded to the kernel's multiples (zeros keep 2:4 and add nothing). `fuse_bias`:
    the bias in the kernel's epilogue, which on an H200 was faster than adding it after the
    product at every batch timed (docs/export.md, "2:4 on a GPU")."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, to_sparse_semi_structured

    rule = SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS[torch.float16]
    out_f, in_f = linear.weight.shape
    rows, cols = (max(m, -(-n // m) * m) for n, m in ((out_f, rule.sparse_min_rows), (in_f, rule.sparse_min_cols)))
    w = F.pad(linear.weight.detach().half(), (0, cols - in_f, 0, rows - out_f)).contiguous()
    compressed = to_sparse_semi_structured(w)
    if not isinstance(compressed, SparseSemiStructuredTensorCUSPARSELT):  # _FORCE_CUTLASS was set
        raise TwoFourRefused("semi_structured export uses cuSPARSELt; torch chose the CUTLASS backend "
                             "(SparseSemiStructuredTensor._FORCE_CUTLASS is set)")
    bias = None if linear.bias is None else linear.bias.detach().half().clone()
    return SemiStructuredLinear(compressed.packed, bias, in_f, out_f, cols, rule.dense_min_rows, fuse_bias=fuse_bias)


def gpu_signature(device: torch.device | str | int | None = None) -> str:
    """What an algorithm id is valid for: the GPU's name and cuSPARSELt's version."""
    return f"{torch.cuda.get_device_name(device)}, cuSPARSELt {torch.backends.cusparselt.version()}"


def _search(m: SemiStructuredLinear, operand: torch.Tensor) -> int:
    """The fastest algorithm for m's weight times `operand` (features, rows), as forward calls it."""
    with warnings.catch_warnings():  # deprecated in favour of a private torch._C entry; same op
        warnings.simplefilter("ignore")
        found = torch._cslt_sparse_mm_search(m.packed, operand)
    return int(found[0] if isinstance(found, tuple) else found)


@torch.no_grad()
def tune(module: nn.Module, batches: Iterable[int]) -> dict[str, dict[int, int]]:
    """Search the fastest algorithm of every 2:4 layer of `module` for each batch size (a layer
    sees `batch` rows: Linear layers after a flatten), for both operand layouts forward meets (a
    row-major input transposed, or the previous 2:4 layer's output), and store the ids in the
    layers. Layers of one shape share each search (the speed of a 2:4 product does not depend on
    the weights' values). The search leaves the bias out, fused or not: a search with a bias and a
    transposed result crashed cuSPARSELt on an H200. Returns {layer name: {alg_key: id}}."""
    found: dict[str, dict[int, int]] = {}
    searched: dict[tuple, int] = {}  # (packed shape, rows, contiguous operand) -> id
    batches = sorted({int(b) for b in batches})
    for name, m in module.named_modules():
        if not isinstance(m, SemiStructuredLinear) or not batches:
            continue
        m.tuned_on = gpu_signature(m.packed.device)
        for rows in sorted({m.padded_rows(b) for b in batches}):
            x = torch.randn(rows, m.padded_in, device=m.packed.device, dtype=torch.float16)
            for operand in (x.t(), x.t().contiguous()):
                shape = (tuple(m.packed.shape), m.padded_in, rows, operand.is_contiguous())
                if shape not in searched:
                    searched[shape] = _search(m, operand)
                m.alg_ids[m.alg_key(rows, operand.is_contiguous())] = searched[shape]
        found[name] = dict(m.alg_ids)
    return found


def retarget(module: nn.Module, signature: str | None = None) -> int:
    """Drop the algorithm ids of a loaded archive's 2:4 layers that were searched on another GPU or
    cuSPARSELt than `signature` (default: that of the GPU each layer is on; layers on no GPU are
    left alone); they fall back to id 0. Returns how many layers were reset."""
    reset = 0
    for _, m in module.named_modules():
        if not getattr(m, "alg_ids", None) or (signature is None and m.packed.device.type != "cuda"):
            continue
        if m.tuned_on != (signature or gpu_signature(m.packed.device)):
            m.alg_ids = {}
            reset += 1
    if reset:
        warnings.warn(f"{reset} 2:4 layers were tuned on another GPU or cuSPARSELt; they use the default "
                      "algorithm here (re-export on this GPU to tune them)", stacklevel=2)
    return reset
