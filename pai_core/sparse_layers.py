"""The layers an export is made of: plain TorchScript-able modules, so their code is saved into
the archive and loading needs no pai-flow (pai_core.export builds nets from them)."""
# No `from __future__ import annotations` here: TorchScript reads class-level attribute annotations
# (SemiStructuredLinear.alg_ids) as types, not strings.

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn



class CsrMatrix(nn.Module):
    """A weight matrix held as a torch.sparse_csr tensor (TorchScript saves these)."""

    def __init__(self, matrix: Tensor):
        super().__init__()
        self.register_buffer("weight", matrix)

    def forward(self) -> Tensor:
        return self.weight


class BsrMatrix(nn.Module):
    """A weight matrix in BSR layout, held as its index and block tensors (TorchScript cannot
    save a sparse_bsr tensor) and assembled, without copying, on each call."""

    def __init__(self, matrix: Tensor):
        super().__init__()
        self.register_buffer("crow_indices", matrix.crow_indices())
        self.register_buffer("col_indices", matrix.col_indices())
        self.register_buffer("values", matrix.values())
        self.size: list[int] = list(matrix.shape)

    def forward(self) -> Tensor:
        return torch.sparse_compressed_tensor(self.crow_indices, self.col_indices, self.values, self.size,
                                              layout=torch.sparse_bsr)


class SparseLinear(nn.Module):
    """y = (W_sparse @ x^T)^T + b: the sparse operand on the left, as torch's kernels want it."""

    def __init__(self, matrix: nn.Module, bias: Optional[Tensor], in_features: int, out_features: int):
        super().__init__()
        self.matrix = matrix
        self.register_buffer("bias", bias)
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        lead = list(x.shape[:-1])
        y = torch.sparse.mm(self.matrix(), x.reshape(-1, self.in_features).t()).t()
        bias = self.bias
        if bias is not None:
            y = y + bias
        return y.reshape(lead + [self.out_features])


class SparseConv2d(nn.Module):
    """Conv2d as im2col + sparse matmul: W_sparse (out, C·kh·kw) @ unfold(x) (C·kh·kw, N·L)."""

    def __init__(self, matrix: nn.Module, bias: Optional[Tensor], conv: nn.Conv2d):
        super().__init__()
        self.matrix = matrix
        self.register_buffer("bias", bias)
        self.out_channels: int = conv.out_channels
        self.kernel_size: list[int] = list(conv.kernel_size)
        self.dilation: list[int] = list(conv.dilation)
        self.padding: list[int] = list(conv.padding)
        self.stride: list[int] = list(conv.stride)

    def forward(self, x: Tensor) -> Tensor:
        n, h, w = x.shape[0], x.shape[2], x.shape[3]
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # N, K, L
        k, length = cols.shape[1], cols.shape[2]
        y = torch.sparse.mm(self.matrix(), cols.transpose(0, 1).reshape(k, n * length))  # out, N·L
        y = y.reshape(self.out_channels, n, length).transpose(0, 1)
        bias = self.bias
        if bias is not None:
            y = y + bias.reshape(1, -1, 1)
        h_out = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        w_out = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        return y.reshape(n, self.out_channels, h_out, w_out)


class SemiStructuredLinear(nn.Module):
    """A 2:4 Linear on cuSPARSELt. The weight, zero-padded to the kernel's multiples (zeros keep
    2:4 and add nothing), is compressed by torch.sparse.to_sparse_semi_structured; forward calls
    the aten op `_cslt_sparse_mm` that torch's own SparseSemiStructuredTensor calls, on the input
    transposed, with rows padded to the kernel's multiple and sliced off again. The result is
    returned as a transposed view: the next 2:4 layer reads it as a contiguous (features, rows)
    operand, with no copy between layers.

    `alg_ids` maps (padded rows, operand layout) -- `alg_key` -- to the cuSPARSELt algorithm
    searched for exactly that call on the exporting GPU (`pai_core.semi_structured.tune`): the
    fastest algorithm differs with the operand's layout as with its shape. Other calls use
    algorithm 0, which every shape has.

    The bias is held zero-padded to the packed weight's rows. With `fuse_bias` it goes into the
    kernel's epilogue (as torch's own 2:4 F.linear passes it, untransposed result), saving the
    separate pass over the output that is otherwise added after the product."""

    alg_ids: Dict[int, int]
    tuned_on: str  # the GPU and cuSPARSELt the ids were searched on: ids are not portable
    fuse_bias: bool

    def __init__(self, packed: Tensor, bias: Optional[Tensor], in_features: int, out_features: int,
                 padded_in: int, row_multiple: int = 8, alg_ids: Optional[Dict[int, int]] = None,
                 fuse_bias: bool = False):
        super().__init__()
        self.register_buffer("packed", packed)
        if bias is not None and bias.shape[0] < packed.shape[0]:
            bias = F.pad(bias, [0, packed.shape[0] - bias.shape[0]])
        self.register_buffer("bias", bias)
        self.fuse_bias = fuse_bias
        self.in_features = in_features
        self.out_features = out_features
        self.padded_in = padded_in
        self.row_multiple = row_multiple
        self.alg_ids = dict(alg_ids or {})
        self.tuned_on = ""

    def padded_rows(self, n: int) -> int:
        return n + (self.row_multiple - n % self.row_multiple) % self.row_multiple

    def alg_key(self, rows: int, operand_contiguous: bool) -> int:
        return 2 * rows + int(operand_contiguous)

    def forward(self, x: Tensor) -> Tensor:
        lead = list(x.shape[:-1])
        x2 = x.reshape(-1, self.in_features)
        n = x2.shape[0]
        rows = self.padded_rows(n)
        if rows != n or self.padded_in != self.in_features:
            x2 = F.pad(x2, [0, self.padded_in - self.in_features, 0, rows - n])
        operand = x2.t()  # (features, rows): contiguous when x2 is the previous layer's transposed view
        if not operand.is_contiguous() and not x2.is_contiguous():
            operand = x2.contiguous().t()
        alg = self.alg_ids.get(self.alg_key(rows, operand.is_contiguous()), 0)
        bias = self.bias
        fused = bias if self.fuse_bias else None
        y = torch._cslt_sparse_mm(self.packed, operand, bias=fused, alg_id=alg).t()  # (rows, padded out), a view
        if rows != n or y.shape[1] != self.out_features:
            y = y[:n, : self.out_features]
        if bias is not None and not self.fuse_bias:
            y = y + bias[: self.out_features]
        return y.reshape(lead + [self.out_features])


class HalfPrecision(nn.Module):
    """float32 in and out, float16 inside: a drop-in replacement for the float32 net."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.half()).float()
