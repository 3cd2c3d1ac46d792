"""Numpy reference of CirculantMatMul: a fully connected layer whose weight is block-circulant.

Cheng et al., "An exploration of parameter redundancy in deep networks with circulant projections" (ICCV
2015): y = x D P with D = diag(s) a fixed random sign flip and P structured. Here P is a (K/b) x (N/b) grid
of b x b circulant blocks (b a power of two; b = K = N is the full-circulant case). Block (i, j) is
circ(c_ij), defined by its first column c_ij:

    circ(c)[m, n] = c[(m - n) mod b]        (each column is the previous one rotated down by one)

With z = x * s split into input blocks z_i (b values each), output block j is

    y_j[n] = sum_i sum_m z_i[m] c_ij[(m - n) mod b]            (a circular CORRELATION of z_i with c_ij)
           = irfft( sum_i conj(rfft(c_ij)) . rfft(z_i) )[n]

since correlating with c is convolving with c reversed, whose DFT is conj(DFT(c)) for real c. Cost per row:
K/b + N/b real FFTs of length b and (K/b)(N/b)(b/2 + 1) complex products, O((K + N) log b + K N / b), against
K N for the dense layer; parameters K N / b (plus K signs).

Inputs: X [..., K]; C [K/b, N/b, b] the first columns; S [K] signs (any floats: the op multiplies by them);
optional B [N]. Y [..., N] = (X * S) P + B. The C++ kernel (custom_ops/circulant.cc) computes the same in
float32 with the FFT of custom_ops/fft.h; this module uses numpy.fft in float64.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from onnxopt.ops import OpSpec


def _check(X: np.ndarray, C: np.ndarray, S: np.ndarray, B: np.ndarray | None, block: int) -> None:
    if block < 2 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 2, got {block}")
    if C.ndim != 3 or C.shape[2] != block or min(C.shape) < 1:
        raise ValueError(f"C must have shape [K/b, N/b, b] with b = block = {block}, got {list(C.shape)}")
    K, N = C.shape[0] * block, C.shape[1] * block
    if X.ndim < 1 or X.shape[-1] != K:
        raise ValueError(
            f"X must have shape [..., K] with K = {K} (C shape {list(C.shape)}), got {list(X.shape)}"
        )
    if S.shape != (K,):
        raise ValueError(f"S must have shape [{K}], got {list(S.shape)}")
    if B is not None and B.shape != (N,):
        raise ValueError(f"B must have shape [{N}], got {list(B.shape)}")


def dense_weight(C: np.ndarray, S: np.ndarray) -> np.ndarray:
    """W = D P as a dense K x N matrix (float64): what the op multiplies X by."""
    kb, nb, b = C.shape
    m, n = np.meshgrid(np.arange(b), np.arange(b), indexing="ij")
    P = C.astype(np.float64)[:, :, (m - n) % b]  # [kb, nb, b, b]: circ(c_ij)
    W = P.transpose(0, 2, 1, 3).reshape(kb * b, nb * b)
    return np.asarray(S, dtype=np.float64)[:, None] * W


def circulant_matmul(
    X: np.ndarray, C: np.ndarray, S: np.ndarray, B: np.ndarray | None = None, block: int | None = None
) -> np.ndarray:
    """Y = (X * S) P + B through real FFTs (see the module docstring); float64 arithmetic, X's dtype out."""
    X, C, S = np.asarray(X), np.asarray(C), np.asarray(S)
    B = None if B is None else np.asarray(B)
    block = int(C.shape[-1]) if block is None else int(block)
    _check(X, C, S, B, block)
    kb, nb, b = C.shape
    lead = X.shape[:-1]
    Z = (X.reshape(-1, kb, b).astype(np.float64)) * S.astype(np.float64).reshape(kb, b)
    Zf = np.fft.rfft(Z, axis=-1)  # [M, kb, nbw]
    Wf = np.conj(np.fft.rfft(C.astype(np.float64), axis=-1))  # [kb, nb, nbw]
    Yf = np.einsum("mif,ijf->mjf", Zf, Wf)
    Y = np.fft.irfft(Yf, n=b, axis=-1).reshape(*lead, nb * b)
    if B is not None:
        Y = Y + B.astype(np.float64)
    return Y.astype(X.dtype)


SPEC = OpSpec(
    name="CirculantMatMul",
    summary="Y = (X * S) P + B, P a grid of b x b circulant blocks, computed through real FFTs",
    inputs=[
        ("X", "float32 [..., K]"),
        ("C", "float32 [K/b, N/b, b], constant; C[i, j] = first column of circulant block (i, j)"),
        ("S", "float32 [K], constant; the sign flip D = diag(S)"),
        ("B", "float32 [N], constant, optional; bias"),
    ],
    outputs=[("Y", "float32 [..., N]")],
    attributes=[("block", "int, b: the block size, a power of two >= 2")],
    constraints=["K and N multiples of b (a pass zero-pads the layer)", "C, S, B constant initializers"],
    formula="""
circ(c)[m, n] = c[(m - n) mod b];  z = X * S in blocks z_i of b
Y_j = irfft( sum_i conj(rfft(C[i, j])) . rfft(z_i) ) + B_j   (= sum_i z_i circ(C[i, j]) + B_j)
""",
    reference=circulant_matmul,
)


class CirculantMatMul(OpRun):
    """onnx.reference evaluator for CirculantMatMul (domain onnxopt)."""

    op_domain = "onnxopt"

    def _run(self, X, C, S, B=None, block=None):
        return (circulant_matmul(X, C, S, B, block if block is not None else C.shape[-1]),)
