"""The export formats, their files and tolerances, and the one error every refusal raises.

A format says how its file is serialized (a `torch.export` program or a TorchScript archive,
whichever torch can save for it; the comment above `FORMATS` says why), the line that loads it
with nothing but torch installed, and the tolerance its outputs must meet against the masked
model's. pai_core.export builds and checks the modules; pai_core.export_checks refuses what a
format cannot express."""
from __future__ import annotations

from dataclasses import dataclass


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
