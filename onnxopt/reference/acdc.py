"""Numpy reference of ACDCMatMul: a fully connected layer whose weight is a stack of ACDC layers.

Moczulski et al., "ACDC: A Structured Efficient Linear Layer" (ICLR 2016). On R^n (n a power of two) one ACDC
layer, acting on a column vector x, is

    x -> A C^T D C x,        A = diag(a), D = diag(d) (n values each), C the orthonormal DCT-II matrix,

    C[k, i] = s_k cos(pi (2 i + 1) k / (2 n)),   s_0 = sqrt(1 / n),  s_k = sqrt(2 / n) for k > 0,

so C^T = C^-1 is the orthonormal DCT-III: C moves x to the cosine domain, D scales it there, C^T moves it back
and A scales it in the signal domain. A stack of depth L (layer l = 0 .. L-1) puts a fixed permutation before
each layer (the paper's interleaved permutations; they let the stack mix coordinates that one layer's
shift-like structure keeps apart):

    h_0 = x,   h_{l+1} = A_l C^T D_l C P_l h_l,   (P_l h)[i] = h[perm_l[i]],   y = h_L[:N] + b.

As a matrix on row vectors (ONNX's Y = X W): W = (A_{L-1} C^T D_{L-1} C P_{L-1} ... A_0 C^T D_0 C P_0)^T, of
which the first N columns are kept. Parameters 2 n L (plus the permutations, fixed and seeded); cost per row
2 L DCTs of length n, O(L n log n), against K N for the dense layer.

Inputs: X [..., n]; A [L, n], D [L, n]; optional P int64 [L, n] (each row a permutation of 0 .. n-1; absent
means identity); optional B [N] with N <= n (absent: N = n). Y [..., N]. The C++ kernel (custom_ops/acdc.cc)
computes the same in float32 with a fast DCT (Makhoul's reordering through a half-length complex FFT); this
module uses the dense DCT matrix in float64.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from onnxopt.ops import OpSpec


def dct_matrix(n: int) -> np.ndarray:
    """C [n, n], the orthonormal DCT-II matrix (float64): C x is the DCT-II of x, C^T y the DCT-III of y."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    C = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    C[0] /= np.sqrt(2.0)
    return C


def _check(X: np.ndarray, A: np.ndarray, D: np.ndarray, P: np.ndarray | None, B: np.ndarray | None) -> None:
    if A.ndim != 2 or min(A.shape) < 1:
        raise ValueError(f"A must have shape [L, n], got {list(A.shape)}")
    n = A.shape[1]
    if n < 2 or n & (n - 1):
        raise ValueError(f"n (A's last dimension) must be a power of two >= 2, got {n}")
    if D.shape != A.shape:
        raise ValueError(f"D must have shape [L, n] = {list(A.shape)}, got {list(D.shape)}")
    if P is not None:
        if P.shape != A.shape:
            raise ValueError(f"P must have shape [L, n] = {list(A.shape)}, got {list(P.shape)}")
        if not all(np.array_equal(np.sort(p), np.arange(n)) for p in P):
            raise ValueError("every row of P must be a permutation of 0 .. n-1")
    if X.ndim < 1 or X.shape[-1] != n:
        raise ValueError(
            f"X must have shape [..., n] with n = {n} (A shape {list(A.shape)}), got {list(X.shape)}"
        )
    if B is not None and (B.ndim != 1 or not 1 <= B.shape[0] <= n):
        raise ValueError(f"B must have shape [N] with 1 <= N <= n = {n}, got {list(B.shape)}")


def acdc_rows(H: np.ndarray, A: np.ndarray, D: np.ndarray, P: np.ndarray | None) -> np.ndarray:
    """The stack applied to rows H [M, n] (float64): for each layer, permute, DCT-II, scale by D, DCT-III,
    scale by A (row-vector form: h C^T is the DCT-II of a row h, h C its DCT-III)."""
    C = dct_matrix(A.shape[1])
    H = np.asarray(H, dtype=np.float64)
    for layer in range(A.shape[0]):
        if P is not None:
            H = H[:, P[layer]]
        H = ((H @ C.T) * D[layer].astype(np.float64)) @ C * A[layer].astype(np.float64)
    return H


def dense_weight(
    A: np.ndarray, D: np.ndarray, P: np.ndarray | None = None, N: int | None = None
) -> np.ndarray:
    """W [n, N] (float64) with Y = X W: the stack applied to the identity's rows, first N columns."""
    n = A.shape[1]
    return acdc_rows(np.eye(n), A, D, P)[:, : n if N is None else N]


def acdc_matmul(
    X: np.ndarray, A: np.ndarray, D: np.ndarray, P: np.ndarray | None = None, B: np.ndarray | None = None
) -> np.ndarray:
    """Y = stack(X)[..., :N] + B (module docstring); float64 arithmetic, X's dtype out."""
    X, A, D = np.asarray(X), np.asarray(A), np.asarray(D)
    P = None if P is None else np.asarray(P, dtype=np.int64)
    B = None if B is None else np.asarray(B)
    _check(X, A, D, P, B)
    n = A.shape[1]
    N = n if B is None else B.shape[0]
    Y = acdc_rows(X.reshape(-1, n), A, D, P)[:, :N]
    if B is not None:
        Y = Y + B.astype(np.float64)
    return Y.reshape(*X.shape[:-1], N).astype(X.dtype)


SPEC = OpSpec(
    name="ACDCMatMul",
    summary="Y = (stack of L ACDC layers A C^T D C P)(X)[..., :N] + B, through fast DCTs",
    inputs=[
        ("X", "float32 [..., n], n a power of two"),
        ("A", "float32 [L, n], constant; the signal-domain diagonals"),
        ("D", "float32 [L, n], constant; the cosine-domain diagonals"),
        ("P", "int64 [L, n], constant, optional (identity if absent); permutation before each layer"),
        ("B", "float32 [N], constant, optional; bias; N <= n outputs (n if absent)"),
    ],
    outputs=[("Y", "float32 [..., N]")],
    constraints=[
        "n a power of two (a pass zero-pads K and N up to it)",
        "A, D, P, B constant initializers",
        "with B given, P must be given too (identity rows for no permutation): no absent input before B",
    ],
    formula="""
C = orthonormal DCT-II [n, n], C^T its inverse (DCT-III)
h_0 = x;  h_{l+1} = A_l * C^T (D_l * C (h_l[P_l]))   for l = 0 .. L-1
Y = h_L[:N] + B
""",
    reference=acdc_matmul,
)


class ACDCMatMul(OpRun):
    """onnx.reference evaluator for ACDCMatMul (domain onnxopt)."""

    op_domain = "onnxopt"

    def _run(self, X, A, D, P=None, B=None):
        return (acdc_matmul(X, A, D, P, B),)
