"""Numpy references of SparseGemm and SparseConv: the ops that run layers pruned by the `prune` method.

A pruned weight is stored in CSR (compressed sparse row) form, one row per output:

    values  [nnz]     float32, the kept weights, row after row
    indices [nnz]     int32, the column of each kept weight, strictly increasing within a row
    row_ptr [R + 1]   int64, row r's weights are values[row_ptr[r] : row_ptr[r + 1]];
                      row_ptr[0] = 0, non-decreasing, row_ptr[R] = nnz

SparseGemm (attribute K): the rows are the N columns of the dense weight W [K, N] (CSR of W^T), so

    Y[..., n] = sum_{j = row_ptr[n]}^{row_ptr[n + 1] - 1} values[j] * X[..., indices[j]] + B[n]  (= X W + B)

SparseConv (attributes C, kernel_shape [kh, kw], strides, pads, dilations, group = 1): the rows are the M
filters of the dense weight W [M, C, kh, kw] flattened to M x (C kh kw), column (c kh + dy) kw + dx, and

    Y = Conv(X, W, B, strides, pads, dilations)          (ONNX Conv, NCHW, group 1)

Both cost 2 nnz multiply-adds per output row or pixel instead of 2 K N or 2 M C kh kw: the C++ kernels
(custom_ops/prune*.cc) only touch the kept weights; where the kept weights fill aligned blocks of R outputs by
C inputs (8x1, 4x1, 1x4: `prune.pattern=4x1` and the like), they run blocked kernels chosen at kernel creation
(custom_ops/prune_block.h; ONNXOPT_SPARSE_FORMAT=csr forces the CSR ones), same semantics. This module
computes in float64 from the densified weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx.reference.op_run import OpRun

from onnxopt.ops import OpSpec


def to_csr(W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values float32, indices int32, row_ptr int64) of the nonzeros of a 2-D matrix, row by row."""
    W = np.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"to_csr takes a 2-D matrix, got shape {list(W.shape)}")
    rows, cols = np.nonzero(W)
    row_ptr = np.zeros(W.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=W.shape[0]), out=row_ptr[1:])
    return W[rows, cols].astype(np.float32), cols.astype(np.int32), row_ptr


def check_csr(values: np.ndarray, indices: np.ndarray, row_ptr: np.ndarray, cols: int) -> None:
    """Raises ValueError naming the offending row or index unless (values, indices, row_ptr) is a valid CSR
    matrix with `cols` columns (the checks the kernels make at creation, with the same wording)."""
    values, indices, row_ptr = np.asarray(values), np.asarray(indices), np.asarray(row_ptr)
    for name, a in (("values", values), ("indices", indices), ("row_ptr", row_ptr)):
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {list(a.shape)}")
    if len(row_ptr) < 2:
        raise ValueError(f"row_ptr must have at least 2 entries (rows + 1), got {len(row_ptr)}")
    if len(indices) != len(values):
        raise ValueError(
            f"indices and values must have the same length nnz, got {len(indices)} and {len(values)}"
        )
    if row_ptr[0] != 0:
        raise ValueError(f"row_ptr[0] must be 0, got {row_ptr[0]}")
    drops = np.flatnonzero(np.diff(row_ptr) < 0)
    if len(drops):
        r = int(drops[0])
        raise ValueError(
            f"row_ptr must be non-decreasing: row_ptr[{r + 1}] = {row_ptr[r + 1]} < "
            f"row_ptr[{r}] = {row_ptr[r]}"
        )
    if row_ptr[-1] != len(values):
        raise ValueError(
            f"row_ptr[{len(row_ptr) - 1}] (the last entry) must equal nnz = {len(values)}, got {row_ptr[-1]}"
        )
    bad = np.flatnonzero((indices < 0) | (indices >= cols))
    if len(bad):
        j = int(bad[0])
        r = int(np.searchsorted(row_ptr, j, side="right") - 1)
        raise ValueError(f"indices[{j}] = {indices[j]} in row {r} is out of range [0, {cols})")
    rows = np.repeat(np.arange(len(row_ptr) - 1), np.diff(row_ptr))
    same_row = rows[1:] == rows[:-1]
    bad = np.flatnonzero(same_row & (indices[1:] <= indices[:-1]))
    if len(bad):
        j = int(bad[0]) + 1
        kind = "duplicate" if indices[j] == indices[j - 1] else "decreasing"
        raise ValueError(
            f"indices must be strictly increasing within a row: indices[{j}] = {indices[j]} after "
            f"indices[{j - 1}] = {indices[j - 1]} in row {rows[j]} ({kind})"
        )


def dense_from_csr(values: np.ndarray, indices: np.ndarray, row_ptr: np.ndarray, cols: int) -> np.ndarray:
    """The dense rows x cols matrix (float64) that a checked CSR triple describes."""
    check_csr(values, indices, row_ptr, cols)
    rows = np.repeat(np.arange(len(row_ptr) - 1), np.diff(row_ptr))
    D = np.zeros((len(row_ptr) - 1, cols))
    D[rows, np.asarray(indices)] = np.asarray(values, np.float64)
    return D


def _check_bias(B: np.ndarray | None, rows: int, dim: str) -> None:
    if B is not None and np.shape(B) != (rows,):
        raise ValueError(f"bias must have shape [{dim}] = [{rows}], got {list(np.shape(B))}")


def sparse_gemm(
    X: np.ndarray,
    values: np.ndarray,
    indices: np.ndarray,
    row_ptr: np.ndarray,
    B: np.ndarray | None = None,
    K: int = 0,
) -> np.ndarray:
    """Y [..., N] = X W + B with W^T the CSR matrix (module docstring); float64 inside, X's dtype out."""
    if K <= 0:
        raise ValueError(f"attribute K must be > 0, got {K}")
    WT = dense_from_csr(values, indices, row_ptr, K)
    _check_bias(B, WT.shape[0], "N")
    X = np.asarray(X)
    if X.ndim < 1 or X.shape[-1] != K:
        raise ValueError(f"X must have shape [..., K] with K = {K}, got {list(X.shape)}")
    Y = X.astype(np.float64) @ WT.T
    if B is not None:
        Y = Y + np.asarray(B, np.float64)
    return Y.astype(X.dtype)


def conv_output_size(size: int, pad: int, kernel: int, stride: int, dilation: int) -> int:
    """ONNX Conv's output length on one axis (pad: both sides summed); <= 0 when the kernel does not fit."""
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


def sparse_conv(
    X: np.ndarray,
    values: np.ndarray,
    indices: np.ndarray,
    row_ptr: np.ndarray,
    B: np.ndarray | None = None,
    C: int = 0,
    kernel_shape: Sequence[int] = (),
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group: int = 1,
) -> np.ndarray:
    """ONNX Conv (NCHW, group 1) of X with the dense weight [M, C, kh, kw] of the CSR; float64 inside."""
    if group != 1:
        raise ValueError(f"only group = 1 is supported, got {group}")
    if C <= 0 or len(kernel_shape) != 2 or min(kernel_shape) < 1:
        raise ValueError(f"C must be > 0 and kernel_shape 2 positive ints, got C = {C}, {list(kernel_shape)}")
    kh, kw = (int(k) for k in kernel_shape)
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilations)
    top, left, bottom, right = (int(p) for p in pads)
    if min(sh, sw, dh, dw) < 1 or min(top, left, bottom, right) < 0:
        raise ValueError(f"strides and dilations must be >= 1 and pads >= 0: {strides}, {dilations}, {pads}")
    W = dense_from_csr(values, indices, row_ptr, C * kh * kw).reshape(-1, C, kh, kw)
    M = W.shape[0]
    _check_bias(B, M, "M")
    X = np.asarray(X)
    if X.ndim != 4 or X.shape[1] != C:
        raise ValueError(f"X must have shape [N, C, H, W] with C = {C}, got {list(X.shape)}")
    n, _, h, w = X.shape
    oh = conv_output_size(h, top + bottom, kh, sh, dh)
    ow = conv_output_size(w, left + right, kw, sw, dw)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"output would be empty: X {list(X.shape)}, kernel {kh}x{kw}, pads {list(pads)}")
    Xp = np.pad(X.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    Y = np.zeros((n, M, oh, ow))
    for dy in range(kh):
        for dx in range(kw):
            y0, x0 = dy * dh, dx * dw
            patch = Xp[:, :, y0 : y0 + sh * (oh - 1) + 1 : sh, x0 : x0 + sw * (ow - 1) + 1 : sw]
            Y += np.einsum("nchw,mc->nmhw", patch, W[:, :, dy, dx])
    if B is not None:
        Y += np.asarray(B, np.float64)[None, :, None, None]
    return Y.astype(X.dtype)


_CSR_INPUTS = [
    ("values", "float32 [nnz], constant; the kept weights, row after row"),
    ("indices", "int32 [nnz], constant; the column of each kept weight, strictly increasing within a row"),
    ("row_ptr", "int64 [R + 1], constant; row r is values[row_ptr[r] : row_ptr[r + 1]]"),
]
_CSR_CONSTRAINTS = [
    "values, indices, row_ptr, bias: constant initializers (packed once at kernel creation)",
    "row_ptr[0] = 0, non-decreasing, row_ptr[R] = nnz; indices in range, no duplicates within a row",
]

GEMM_SPEC = OpSpec(
    name="SparseGemm",
    summary="Y = X W + B with W [K, N] pruned, stored as the CSR of W^T (one row per output column)",
    inputs=[("X", "float32 [..., K]"), *_CSR_INPUTS, ("bias", "float32 [N], constant, optional")],
    outputs=[("Y", "float32 [..., N]")],
    attributes=[("K", "int > 0: the input width (columns of the CSR rows)")],
    constraints=[*_CSR_CONSTRAINTS, "R = N = len(row_ptr) - 1; indices in [0, K)"],
    formula="Y[..., n] = sum_{j = row_ptr[n]}^{row_ptr[n+1]-1} values[j] * X[..., indices[j]] + bias[n]",
    reference=sparse_gemm,
)

CONV_SPEC = OpSpec(
    name="SparseConv",
    summary="ONNX Conv (NCHW, group 1) whose pruned weight [M, C, kh, kw] is stored as CSR of M x (C kh kw)",
    inputs=[("X", "float32 [N, C, H, W]"), *_CSR_INPUTS, ("bias", "float32 [M], constant, optional")],
    outputs=[("Y", "float32 [N, M, OH, OW]")],
    attributes=[
        ("C", "int > 0: input channels"),
        ("kernel_shape", "ints [kh, kw]"),
        ("strides", "ints [sh, sw], default [1, 1]"),
        ("pads", "ints [top, left, bottom, right], default zeros"),
        ("dilations", "ints [dh, dw], default [1, 1]"),
        ("group", "int, only 1"),
    ],
    constraints=[*_CSR_CONSTRAINTS, "R = M = len(row_ptr) - 1; column (c kh + dy) kw + dx in [0, C kh kw)"],
    formula="""
W[m, c, dy, dx] = values[j] for the j in row m with indices[j] = (c kh + dy) kw + dx, else 0
Y = Conv(X, W, bias, strides, pads, dilations)
""",
    reference=sparse_conv,
)


class SparseGemm(OpRun):
    """onnx.reference evaluator for SparseGemm (domain onnxopt)."""

    op_domain = "onnxopt"

    def _run(self, X, values, indices, row_ptr, bias=None, K=None):
        return (sparse_gemm(X, values, indices, row_ptr, bias, int(K or 0)),)


class SparseConv(OpRun):
    """onnx.reference evaluator for SparseConv (domain onnxopt)."""

    op_domain = "onnxopt"

    def _run(
        self,
        X,
        values,
        indices,
        row_ptr,
        bias=None,
        C=None,
        kernel_shape=None,
        strides=None,
        pads=None,
        dilations=None,
        group=None,
    ):
        return (
            sparse_conv(
                X,
                values,
                indices,
                row_ptr,
                bias,
                int(C or 0),
                kernel_shape or (),
                strides or (1, 1),
                pads or (0, 0, 0, 0),
                dilations or (1, 1),
                int(group or 1),
            ),
        )
