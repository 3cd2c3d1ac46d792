"""Numpy reference of FastfoodMatMul: a fully connected layer whose weight is a stack of Adaptive Fastfood
blocks.

Yang et al., "Deep Fried Convnets" (ICCV 2015): one block maps R^n -> R^n (n a power of two) as

    V x = S H G Pi H B x

with B, G, S diagonal (learned), H the unnormalised n x n Walsh-Hadamard matrix
(H[i, j] = (-1)^popcount(i & j), so H H = n I; any 1/n scale lives in S) and Pi a fixed permutation.
Here (Pi v)[i] = v[P[i]] (a gather).
A stack of d blocks V_d ... V_1 (block 1 applied first) stands for W^T of a layer y = x W + b with W K x N,
K, N <= n: the input row is zero-padded to n, pushed through the d blocks, and the first N values are kept:

    z_0 = [x, 0 ... 0] (n values);   z_t = S_t * H(G_t * (H(B_t * z_{t-1}))[P_t]);   y = z_d[:N] + bias

H is applied by the fast Walsh-Hadamard transform: log2 n stages of n/2 butterflies (a, b) -> (a + b, a - b),
n log2 n additions and no multiplications. Cost per row: d (2 n log2 n + 3 n) against 2 K N for the dense
layer; parameters 3 n d floats plus the d permutations (n int64 each) and the bias.

Inputs: X [..., K]; B, G, S float32 [d, n]; P int64 [d, n] (each row a permutation of 0..n-1); optional
bias [N]. Attributes in_features = K and out_features = N. Y [..., N]. The C++ kernel
(custom_ops/fastfood.cc) computes the same in float32 with an in-place fast transform; this module uses
float64.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from onnxopt.ops import OpSpec


def fwht(X: np.ndarray) -> np.ndarray:
    """Unnormalised Walsh-Hadamard transform along the last axis (length a power of two): X H, H = H^T.

    Stage h (h = 1, 2, 4, ...) pairs element i with i + h inside each group of 2h and replaces (a, b) with
    (a + b, a - b): log2 n stages of butterflies, the Sylvester construction
    H_2n = [[H_n, H_n], [H_n, -H_n]]."""
    X = np.array(X, dtype=np.result_type(X, np.float32), copy=True)
    n = X.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"the Walsh-Hadamard length must be a power of two, got {n}")
    lead = X.shape[:-1]
    h = 1
    while h < n:
        Y = X.reshape(*lead, n // (2 * h), 2, h)  # a view: the butterflies update X in place
        a, b = Y[..., 0, :], Y[..., 1, :]
        a += b  # a + b
        b *= -2.0
        b += a  # (a + b) - 2 b = a - b
        h *= 2
    return X


def hadamard(n: int) -> np.ndarray:
    """The n x n unnormalised Walsh-Hadamard matrix (float64), H[i, j] = (-1)^popcount(i & j)."""
    return fwht(np.eye(n))


def _check(X, B, G, S, P, bias, K: int, N: int) -> None:
    if B.ndim != 2 or min(B.shape) < 1:
        raise ValueError(f"B must have shape [d, n], got {list(B.shape)}")
    d, n = B.shape
    if n & (n - 1):
        raise ValueError(f"n (the last dimension of B) must be a power of two, got {n}")
    for name, t in (("G", G), ("S", S), ("P", P)):
        if t.shape != (d, n):
            raise ValueError(f"{name} must have shape [d, n] = [{d}, {n}] like B, got {list(t.shape)}")
    if not (1 <= K <= n and 1 <= N <= n):
        raise ValueError(f"in_features {K} and out_features {N} must be in [1, n = {n}]")
    if any(not np.array_equal(np.sort(p), np.arange(n)) for p in P):
        raise ValueError(f"every row of P must be a permutation of 0..{n - 1}")
    if X.ndim < 1 or X.shape[-1] != K:
        raise ValueError(f"X must have shape [..., K] with K = in_features = {K}, got {list(X.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape [N] = [{N}], got {list(bias.shape)}")


def fastfood_matmul(
    X: np.ndarray,
    B: np.ndarray,
    G: np.ndarray,
    S: np.ndarray,
    P: np.ndarray,
    bias: np.ndarray | None = None,
    in_features: int | None = None,
    out_features: int | None = None,
) -> np.ndarray:
    """Y = the stack of Fastfood blocks applied to X's rows (module docstring); float64 inside, X's dtype
    out."""
    X, B, G, S, P = (np.asarray(t) for t in (X, B, G, S, P))
    bias = None if bias is None else np.asarray(bias)
    d, n = B.shape if B.ndim == 2 else (0, 0)
    K = int(X.shape[-1]) if in_features is None else int(in_features)
    N = n if out_features is None else int(out_features)
    _check(X, B, G, S, P, bias, K, N)
    lead = X.shape[:-1]
    Z = np.zeros((int(np.prod(lead)), n))
    Z[:, :K] = X.reshape(-1, K)
    for t in range(d):
        Z = S[t] * fwht(G[t] * fwht(B[t] * Z)[:, P[t]])
    Y = Z[:, :N]
    if bias is not None:
        Y = Y + bias.astype(np.float64)
    return Y.reshape(*lead, N).astype(X.dtype)


def dense_weight(B, G, S, P, K: int, N: int) -> np.ndarray:
    """W (K x N, float64) with x W = the op's output without bias: the stack applied to identity rows."""
    return fastfood_matmul(np.eye(K), B, G, S, P, None, K, N)


SPEC = OpSpec(
    name="FastfoodMatMul",
    summary="Y = a stack of d Adaptive Fastfood blocks S H G Pi H B (H Walsh-Hadamard) applied to X + bias",
    inputs=[
        ("X", "float32 [..., K]"),
        ("B", "float32 [d, n], constant; diagonal B of each block (n a power of two >= K, N)"),
        ("G", "float32 [d, n], constant; diagonal G of each block"),
        ("S", "float32 [d, n], constant; diagonal S of each block (carries H's 1/n scales)"),
        ("P", "int64 [d, n], constant; permutation of each block, (Pi v)[i] = v[P[i]]"),
        ("bias", "float32 [N], constant, optional"),
    ],
    outputs=[("Y", "float32 [..., N]")],
    attributes=[("in_features", "int, K <= n"), ("out_features", "int, N <= n")],
    constraints=["n a power of two", "each row of P a permutation of 0..n-1", "B, G, S, P, bias constant"],
    formula="""
z_0 = [X, 0 ... 0] (n values);  z_t = S_t * H(G_t * (H(B_t * z_{t-1}))[P_t]),  t = 1..d
Y = z_d[:N] + bias;   H unnormalised Walsh-Hadamard (fast transform, n log2 n adds)
""",
    reference=fastfood_matmul,
)


class FastfoodMatMul(OpRun):
    """onnx.reference evaluator for FastfoodMatMul (domain onnxopt)."""

    op_domain = "onnxopt"

    def _run(self, X, B, G, S, P, bias=None, in_features=None, out_features=None):
        return (fastfood_matmul(X, B, G, S, P, bias, in_features, out_features),)
