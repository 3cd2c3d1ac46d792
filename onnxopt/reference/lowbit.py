"""Numpy reference of LowBitMatMul: y = x W + b with W stored as group-wise quantized 2-, 3- or 4-bit codes.

Weight-only low-bit quantization (as in GPTQ, Frantar et al., ICLR 2023, and AWQ): the weight W (K x N)
is cut, per output column n, into groups of G consecutive k; group g of column n keeps one scale and one
zero point,

    W[k, n] = scale[n, g] * (q[k, n] - zero[n, g]),     g = k // G,   q and zero integers in [0, 2^bits).

K is padded to Kp = ceil(K / G) G (padded codes are multiplied by zero inputs). Per output n,

    y[n] = sum_g scale[n, g] (sum_{k in g} q[k, n] x[k] - zero[n, g] sum_{k in g} x[k]) + b[n],

which is how the C++ kernel (custom_ops/lowbit.cc) computes batch 1: the scale once per group, the zero point
through the group's input sum. Storage is bits/8 bytes per weight plus 5 bytes per group (float32 scale,
uint8 zero), e.g. 4.625 bits per weight at 4 bits and G = 64.

Code layout (Q: uint8 [N, Kp bits / 8]): per output column, chunks of 32 consecutive k (G a multiple of 32):
  bits 4: 16 bytes, byte j = q[j] | q[j + 16] << 4;
  bits 2: 8 bytes, byte j = q[j] | q[j + 8] << 2 | q[j + 16] << 4 | q[j + 24] << 6;
  bits 3: the low two bits of the 32 codes as a bits-2 chunk, then 4 bytes: the little-endian uint32
          whose bit j is bit 2 of q[j].
so that SIMD unpacking is an and and a shift per half (lowbit_avx2.cc).

With act_bits = 8 (bits 4 only), each row of X is first quantized to int8, symmetric, in float32 arithmetic:
a = max_k |x[k]|, xq[k] = round_half_even(x[k] * (127 / a)) in [-127, 127], s_x = a / 127 (an all-zero row:
xq = 0, s_x = 1), and
    y[n] = s_x sum_g scale[n, g] (sum_{k in g} q[k, n] xq[k] - zero[n, g] sum_{k in g} xq[k]) + b[n],
whose inner sums are exact integers (the kernel's vpmaddubsw / vpmaddwd dot products).

LowBitConv is the same storage for an ONNX Conv (NCHW, group 1) with weight A [M, C, kh, kw]: its im2col form
W = A reshaped to M x (C kh kw), transposed (K = C kh kw inputs (c, dy, dx) in that order, N = M outputs), so
every output filter is one column of codes with groups along its C kh kw reduction axis, and

    Y = Conv(X, A~, B, strides, pads, dilations),   A~[m, c, dy, dx] = W~[(c kh + dy) kw + dx, m].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx.reference.op_run import OpRun

from onnxopt.ops import OpSpec

CHUNK = 32
BITS = (2, 3, 4)


def padded_k(K: int, group_size: int) -> int:
    """Kp: K rounded up to a multiple of the group size."""
    return -(-K // group_size) * group_size


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Q uint8 [N, Kp bits / 8] from codes q [Kp, N] (integers < 2^bits; Kp a multiple of 32)."""
    Kp, N = q.shape
    if bits not in BITS or Kp % CHUNK:
        raise ValueError(f"bits must be in {BITS} and Kp a multiple of {CHUNK}, got bits={bits} Kp={Kp}")
    c = np.ascontiguousarray(q.T).astype(np.uint32).reshape(N, Kp // CHUNK, CHUNK)
    if bits == 4:
        out = c[..., :16] | c[..., 16:] << 4
    else:
        low = c & 3
        out = low[..., 0:8] | low[..., 8:16] << 2 | low[..., 16:24] << 4 | low[..., 24:32] << 6
        if bits == 3:
            hi = ((c >> 2) & 1) << np.arange(CHUNK, dtype=np.uint32)
            word = hi.sum(axis=-1, dtype=np.uint32)[..., None]
            out = np.concatenate([out, (word >> np.array([0, 8, 16, 24], np.uint32)) & 255], axis=-1)
    return out.astype(np.uint8).reshape(N, -1)


def unpack_codes(Q: np.ndarray, bits: int) -> np.ndarray:
    """Codes q [Kp, N] (uint8) from Q uint8 [N, Kp bits / 8]: the inverse of pack_codes."""
    N = Q.shape[0]
    per = 4 * bits  # bytes per chunk
    b = Q.reshape(N, -1, per).astype(np.uint32)
    if bits == 4:
        c = np.concatenate([b & 15, b >> 4], axis=-1)
    else:
        c = np.concatenate([(b[..., :8] >> (2 * i)) & 3 for i in range(4)], axis=-1)
        if bits == 3:
            word = b[..., 8] | b[..., 9] << 8 | b[..., 10] << 16 | b[..., 11] << 24
            c = c | ((word[..., None] >> np.arange(CHUNK, dtype=np.uint32)) & 1) << 2
    return np.ascontiguousarray(c.reshape(N, -1).T).astype(np.uint8)


def dequantize(Q: np.ndarray, S: np.ndarray, Z: np.ndarray, K: int, bits: int, group_size: int) -> np.ndarray:
    """W [K, N] (float64) = scale (q - zero), group-wise, the padded rows dropped."""
    q = unpack_codes(Q, bits).astype(np.float64)  # [Kp, N]
    g = np.arange(q.shape[0]) // group_size
    W = (q - Z.T.astype(np.float64)[g]) * S.T.astype(np.float64)[g]
    return W[:K]


def quantize_rows(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(xq int8 [..., K], s_x float32 [..., 1]) of act_bits = 8 (module docstring), float32 as the kernel."""
    X = np.asarray(X, np.float32)
    if not np.all(np.isfinite(X)):
        raise ValueError("X holds a non-finite value; act_bits = 8 cannot quantize it")
    a = np.max(np.abs(X), axis=-1, keepdims=True) if X.shape[-1] else np.zeros((*X.shape[:-1], 1), np.float32)
    safe = np.where(a > 0, a, np.float32(1))
    inv = np.where(a > 0, np.float32(127) / safe, np.float32(0)).astype(np.float32)
    xq = np.clip(np.rint((X * inv).astype(np.float32)), -127, 127).astype(np.int8)
    return xq, np.where(a > 0, a / np.float32(127), np.float32(1)).astype(np.float32)


def _check(X, Q, S, Z, B, K, N, bits, group_size) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group_size < CHUNK or group_size % CHUNK:
        raise ValueError(f"group_size must be a positive multiple of {CHUNK}, got {group_size}")
    Kp = padded_k(K, group_size)
    if Q.dtype != np.uint8 or Q.shape != (N, Kp * bits // 8):
        raise ValueError(f"Q must be uint8 [{N}, {Kp * bits // 8}], got {Q.dtype} {list(Q.shape)}")
    for name, T, dt in (("S", S, np.float32), ("Z", Z, np.uint8)):
        if T.dtype != dt or T.shape != (N, Kp // group_size):
            raise ValueError(f"{name} must be {np.dtype(dt)} [{N}, {Kp // group_size}], got {list(T.shape)}")
    if Z.size and int(Z.max()) >= 1 << bits:
        raise ValueError(f"Z holds {int(Z.max())}, not a {bits}-bit code")
    if X.ndim < 1 or X.shape[-1] != K:
        raise ValueError(f"X must have shape [..., {K}], got {list(X.shape)}")
    if B is not None and B.shape != (N,):
        raise ValueError(f"B must have shape [{N}], got {list(B.shape)}")


def lowbit_matmul(
    X: np.ndarray,
    Q: np.ndarray,
    S: np.ndarray,
    Z: np.ndarray,
    B: np.ndarray | None = None,
    *,
    K: int,
    N: int,
    bits: int,
    group_size: int,
    act_bits: int = 0,
) -> np.ndarray:
    """Y = X W + B with W dequantized from (Q, S, Z) (module docstring); float64 arithmetic, float32 out.
    act_bits = 8: X W becomes s_x (xq W) with X's rows quantized to int8 (quantize_rows)."""
    X, Q, S, Z = np.asarray(X), np.asarray(Q), np.asarray(S), np.asarray(Z)
    B = None if B is None else np.asarray(B)
    _check(X, Q, S, Z, B, K, N, bits, group_size)
    if act_bits not in (0, 8) or (act_bits == 8 and bits != 4):
        raise ValueError(f"act_bits must be 0, or 8 with bits = 4; got act_bits={act_bits} bits={bits}")
    if act_bits == 8:
        xq, sx = quantize_rows(X)
        Y = sx.astype(np.float64) * (xq.astype(np.float64) @ dequantize(Q, S, Z, K, bits, group_size))
    else:
        Y = X.astype(np.float64) @ dequantize(Q, S, Z, K, bits, group_size)
    if B is not None:
        Y = Y + B.astype(np.float64)
    return Y.astype(np.float32)


def conv_output_size(size: int, pad: int, kernel: int, stride: int, dilation: int) -> int:
    """ONNX Conv's output length on one axis (pad: both sides summed); <= 0 when the kernel does not fit."""
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


def conv_nchw(X: np.ndarray, A: np.ndarray, strides, pads, dilations) -> np.ndarray:
    """ONNX Conv (group 1, no bias) of X [n, C, H, W] with A [M, C, kh, kw] in float64."""
    M, _, kh, kw = A.shape
    sh, sw = strides
    dh, dw = dilations
    top, left, bottom, right = pads
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
            Y += np.einsum("nchw,mc->nmhw", patch, A[:, :, dy, dx])
    return Y


def lowbit_conv(
    X: np.ndarray,
    Q: np.ndarray,
    S: np.ndarray,
    Z: np.ndarray,
    B: np.ndarray | None = None,
    *,
    C: int,
    M: int,
    kernel_shape: Sequence[int],
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    bits: int,
    group_size: int,
) -> np.ndarray:
    """Y = Conv(X, A~, B), A~ [M, C, kh, kw] dequantized from (Q, S, Z) (module docstring); float64 inside."""
    X, Q, S, Z = np.asarray(X), np.asarray(Q), np.asarray(S), np.asarray(Z)
    B = None if B is None else np.asarray(B)
    if len(kernel_shape) != 2 or min(kernel_shape) < 1 or C < 1:
        raise ValueError(f"C must be > 0 and kernel_shape 2 positive ints, got C = {C}, {list(kernel_shape)}")
    strides, pads, dilations = (tuple(int(v) for v in a) for a in (strides, pads, dilations))
    if len(strides) != 2 or len(dilations) != 2 or len(pads) != 4:
        raise ValueError(f"strides, dilations need 2 values and pads 4: {strides}, {dilations}, {pads}")
    if min(strides + dilations) < 1 or min(pads) < 0:
        raise ValueError(f"strides and dilations must be >= 1 and pads >= 0: {strides}, {dilations}, {pads}")
    kh, kw = (int(k) for k in kernel_shape)
    K = C * kh * kw
    if X.ndim != 4 or X.shape[1] != C:
        raise ValueError(f"X must have shape [N, C, H, W] with C = {C}, got {list(X.shape)}")
    _check(np.zeros((1, K)), Q, S, Z, B, K, M, bits, group_size)  # X is checked above
    A = dequantize(Q, S, Z, K, bits, group_size).T.reshape(M, C, kh, kw)
    Y = conv_nchw(X, A, strides, pads, dilations)
    if B is not None:
        Y += B.astype(np.float64)[None, :, None, None]
    return Y.astype(np.float32)


SPEC = OpSpec(
    name="LowBitMatMul",
    summary="Y = X W + B, W group-wise quantized to 2, 3 or 4 bits (weight-only), packed per output column",
    inputs=[
        ("X", "float32 [..., K]"),
        ("Q", "uint8 [N, Kp bits / 8], constant; packed codes, Kp = K rounded up to group_size"),
        ("S", "float32 [N, Kp / group_size], constant; scales"),
        ("Z", "uint8 [N, Kp / group_size], constant; zero points (< 2^bits)"),
        ("B", "float32 [N], constant, optional; bias"),
    ],
    outputs=[("Y", "float32 [..., N]")],
    attributes=[
        ("K", "int, input features"),
        ("N", "int, output features"),
        ("bits", "int, 2, 3 or 4"),
        ("group_size", "int, G: consecutive k sharing a scale and zero point, a multiple of 32"),
        ("act_bits", "int, 0 (default: float activations) or 8 (rows of X quantized to int8; bits 4 only)"),
    ],
    constraints=["Q, S, Z, B constant initializers", "chunk layout of Q: see onnxopt/reference/lowbit.py"],
    formula="""
W[k, n] = S[n, k // G] * (q[k, n] - Z[n, k // G]),  k < K (padded codes meet zero inputs)
Y[..., n] = sum_k X[..., k] W[k, n] + B[n]
""",
    reference=lowbit_matmul,
)


CONV_SPEC = OpSpec(
    name="LowBitConv",
    summary="ONNX Conv (NCHW, group 1), weight group-wise quantized to 2, 3 or 4 bits per output filter",
    inputs=[
        ("X", "float32 [N, C, H, W]"),
        (
            "Q",
            "uint8 [M, Kp bits / 8], constant; packed codes of each filter, K = C kh kw, Kp = K rounded up",
        ),
        ("S", "float32 [M, Kp / group_size], constant; scales"),
        ("Z", "uint8 [M, Kp / group_size], constant; zero points (< 2^bits)"),
        ("B", "float32 [M], constant, optional; bias"),
    ],
    outputs=[("Y", "float32 [N, M, OH, OW]")],
    attributes=[
        ("C", "int, input channels"),
        ("M", "int, output channels"),
        ("kernel_shape", "ints [kh, kw]"),
        ("strides", "ints [sh, sw], default [1, 1]"),
        ("pads", "ints [top, left, bottom, right], default zeros"),
        ("dilations", "ints [dh, dw], default [1, 1]"),
        ("bits", "int, 2, 3 or 4"),
        (
            "group_size",
            "int, G: consecutive (c, dy, dx) of a filter sharing a scale and zero, a multiple of 32",
        ),
    ],
    constraints=[
        "Q, S, Z, B constant initializers",
        "chunk layout of Q: as LowBitMatMul's, one column per filter",
    ],
    formula="""
A[m, c, dy, dx] = S[m, k // G] * (q[k, m] - Z[m, k // G]),  k = (c kh + dy) kw + dx
Y = Conv(X, A, B, strides, pads, dilations)
""",
    reference=lowbit_conv,
)


class LowBitMatMul(OpRun):
    """onnx.reference evaluator for LowBitMatMul (domain onnxopt)."""

    op_domain = "onnxopt"

    def _run(self, X, Q, S, Z, B=None, K=None, N=None, bits=None, group_size=None, act_bits=None):
        kw = dict(K=K, N=N, bits=bits, group_size=group_size, act_bits=act_bits or 0)
        return (lowbit_matmul(X, Q, S, Z, B, **kw),)


class LowBitConv(OpRun):
    """onnx.reference evaluator for LowBitConv (domain onnxopt)."""

    op_domain = "onnxopt"

    def _run(
        self,
        X,
        Q,
        S,
        Z,
        B=None,
        C=None,
        M=None,
        kernel_shape=None,
        strides=None,
        pads=None,
        dilations=None,
        bits=None,
        group_size=None,
    ):
        return (
            lowbit_conv(
                X,
                Q,
                S,
                Z,
                B,
                C=C,
                M=M,
                kernel_shape=kernel_shape,
                strides=strides or (1, 1),
                pads=pads or (0, 0, 0, 0),
                dilations=dilations or (1, 1),
                bits=bits,
                group_size=group_size,
            ),
        )
