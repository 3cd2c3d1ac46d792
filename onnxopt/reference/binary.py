"""Numpy reference of BinaryMatMul and BinaryConv: layers whose weight is one bit per entry with a per-output
scale (binary-weight networks, XNOR-Net), optionally on binarized activations.

Weights. Bit b[k, n] in {0, 1} per weight and one or two float32 numbers per output n (S [N, 1] or [N, 2]):
    weights = "sign":  W[k, n] = S[n, 0] (2 b - 1)         (XNOR-Net: b = [W >= 0], S = mean |W_n|)
    weights = "01":    W[k, n] = S[n, 0] b + S[n, 1]        ({0,1} weights after Kim et al.: W ~ a B + c)
Both are W = P[n] b + Q[n] with (P, Q) = (2 S0, -S0) or (S0, S1), and every kernel computes that form.

BinaryMatMul, mode "partial" (binary weights, float activations): with S1[n] = sum_{k: b[k,n]=1} x[k] and
Sx = sum_k x[k],    y[n] = P[n] S1[n] + Q[n] Sx + bias[n]        (= x W + bias).

Mode "full" (XNOR-Net): activations are binarized too, s(x) = +1 if x >= 0 else -1, scaled by
kappa = mean_k |x[k]| of the row. With a[k] = [x[k] >= 0] and n = K, the integer parts
    D1[n] = sum_{k: b=1} s(x[k]) = 2 popcount(a & b_n) - popcount(b_n)
    D0    = sum_k s(x[k])        = 2 popcount(a) - K
give y[n] = kappa (P[n] D1[n] + Q[n] D0) + bias[n]. For sign weights P D1 + Q D0 =
S0 (K - 2 popcount(a ^ b_n)), XNOR-Net's XNOR-popcount dot product; the kernels use the AND form, which
serves both weight kinds.

Centering (full mode, optional input T, one value per input feature or channel): activations are binarized
around T instead of 0, x ~ T + kappa s(x - T), so that inputs that are not zero-centred (after a ReLU every
sign is +1) keep their information: s = s(x - T), kappa = mean |x - T|, and the layer adds T W (its exact
contribution through the binary weight), y[n] += TW[n] = sum_k T[k] W[k, n]. T absent: T = 0.

BinaryConv (always full; ONNX Conv semantics, NCHW, group 1, any kernel size, strides, dilations, pads): the
same per output pixel over its receptive field. Padding: a binary activation has no zero, so padded taps are
taken out of the sums (pad acts as 0, as in a zero-padded float conv): D1 and D0 run over the taps that fall
inside the image, with K the count of those (taps x C), and kappa = (sum over the valid field of |x|) /
(kh kw C): XNOR-Net's K, the channel-mean of |x| box-filtered with zero padding. The kernel computes the
whole field with padded pixels' bits 0 and corrects by per-tap popcounts of b (only border pixels differ).
With centering T [C], padded taps stay out of every term: y += sum over the valid taps (dy, dx) of
sum_c T[c] W[m, c, dy, dx] (per-tap constants summed like the popcounts).

k-bit activations (DoReFa-style; attribute act_bits = k in 2..8, with act_scale = s > 0; BinaryMatMul in mode
"full", BinaryConv): instead of signs, activations are quantized uniformly to k-bit codes in a clipped range,
    u[k] = clamp(rint((x[k] - T[k]) / s), 0, L),    L = 2^k - 1,    x ~ T + s u
computed in float32 exactly as written in act_codes (x - T, times r = float32(1 / s), round half to even), so
kernels and reference agree code for code. T (input T, default 0) is the bottom of the range, s the step, the
top clip T + s L. With bit planes a_i[k] = bit i of u[k], the integer parts are bit-serial AND-popcounts:
    C[n] = sum_k b[k, n] u[k] = sum_i 2^i popcount(a_i & b_n),    U = sum_k u[k] = sum_i 2^i popcount(a_i)
and y[n] = s (P[n] C[n] + Q[n] U) + TW[n] + bias[n] (for sign weights P C + Q U = alpha sum_i 2^i (2 popcount(
a_i & b_n) - popcount(a_i))). No scale per row: s is static, calibrated by the pass. BinaryConv: per output
pixel over its receptive field, padded taps hold code 0 and no T, so they add nothing (pad acting as 0).

Bit layout (uint8, bit j of byte i is entry 8 i + j, little-endian, so bytes read as uint64 words):
    BinaryMatMul: Wbits [N, Kp / 8], Kp = K rounded up to 64; row n holds b[0..K, n]; padded bits 0.
    BinaryConv:   Wbits [M, kh kw Cp / 8], Cp = C rounded up to 64; row m holds b[m, c, dy, dx] at bit
                  (dy kw + dx) Cp + c (channel fastest: one pixel's channels are whole words); padded bits 0.
Storage: 1 bit per weight (plus channel padding) and 4 or 8 bytes per output: ~32x below float32.
"""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from onnxopt.ops import OpSpec

WORD = 64
MODES = ("partial", "full")
WEIGHTS = ("sign", "01")
MAX_ACT_BITS = 8  # act_bits 1 (XNOR signs) .. 8 (k-bit codes)


def padded(n: int) -> int:
    """n rounded up to a multiple of 64 (one uint64 word of bits)."""
    return -(-n // WORD) * WORD


def pack_bits(b: np.ndarray) -> np.ndarray:
    """uint8 [R, L / 8] from bits b [R, L] (L a multiple of 8): bit j of byte i is b[:, 8 i + j]."""
    return np.packbits(np.asarray(b, np.uint8), axis=-1, bitorder="little")


def unpack_bits(Wbits: np.ndarray, length: int) -> np.ndarray:
    """Bits [R, length] (uint8 0/1) from packed rows: the inverse of pack_bits."""
    return np.unpackbits(Wbits, axis=-1, count=length, bitorder="little")


def pq(S: np.ndarray, weights: str) -> tuple[np.ndarray, np.ndarray]:
    """(P, Q) float64 [N] with W = P b + Q (module docstring)."""
    S = S.astype(np.float64)
    return (2 * S[:, 0], -S[:, 0]) if weights == "sign" else (S[:, 0], S[:, 1])


def _check_s(S: np.ndarray, N: int, weights: str) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    cols = 1 if weights == "sign" else 2
    if S.dtype != np.float32 or S.shape != (N, cols):
        raise ValueError(
            f"S must be float32 [{N}, {cols}] for weights={weights}, got {S.dtype} {list(S.shape)}"
        )


def act_codes(X: np.ndarray, T: np.ndarray | None, act_bits: int, act_scale: float) -> np.ndarray:
    """k-bit codes u (int64, X's shape) of activations X: clamp(rint((X - T) * r), 0, 2^k - 1) in float32
    arithmetic with r = float32(1 / act_scale), the kernels' exact steps. T broadcasts against X."""
    x = np.asarray(X, np.float32)
    t = np.float32(0) if T is None else np.asarray(T, np.float32)
    r = np.float32(1) / np.float32(act_scale)
    v = (x - t) * r  # float32: one rounding per step, as in the kernels
    return np.clip(np.rint(v), 0, 2**act_bits - 1).astype(np.int64)


def _check_act(act_bits: int, act_scale: float | None, mode: str = "full") -> None:
    if not 1 <= act_bits <= MAX_ACT_BITS:
        raise ValueError(f"act_bits must be in [1, {MAX_ACT_BITS}], got {act_bits}")
    if act_bits == 1:
        return
    if mode != "full":
        raise ValueError("act_bits >= 2 applies to mode 'full' only")
    if act_scale is None or not np.isfinite(act_scale) or act_scale <= 0:
        raise ValueError(f"act_bits >= 2 needs a finite act_scale > 0, got {act_scale}")


def matmul_bits(Wbits: np.ndarray, K: int) -> np.ndarray:
    """b [K, N] (int64 0/1) of BinaryMatMul's packed weight."""
    return unpack_bits(Wbits, K).T.astype(np.int64)


def binary_matmul(
    X: np.ndarray,
    Wbits: np.ndarray,
    S: np.ndarray,
    B: np.ndarray | None = None,
    *,
    K: int,
    N: int,
    mode: str = "full",
    weights: str = "sign",
    T: np.ndarray | None = None,
    act_bits: int = 1,
    act_scale: float | None = None,
) -> np.ndarray:
    """Y [..., N] of BinaryMatMul (module docstring); float64 arithmetic, float32 out."""
    X, Wbits, S = np.asarray(X), np.asarray(Wbits), np.asarray(S)
    _check_t(T, K, B, mode)
    _check_act(act_bits, act_scale, mode)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_s(S, N, weights)
    if Wbits.dtype != np.uint8 or Wbits.shape != (N, padded(K) // 8):
        raise ValueError(
            f"Wbits must be uint8 [{N}, {padded(K) // 8}], got {Wbits.dtype} {list(Wbits.shape)}"
        )
    if X.ndim < 1 or X.shape[-1] != K:
        raise ValueError(f"X must have shape [..., {K}], got {list(X.shape)}")
    if B is not None and np.shape(B) != (N,):
        raise ValueError(f"B must have shape [{N}], got {list(np.shape(B))}")
    b = matmul_bits(Wbits, K)
    P, Q = pq(S, weights)
    x = X.reshape(-1, K).astype(np.float64)
    if mode == "partial":
        Y = P * (x @ b) + Q * x.sum(axis=1, keepdims=True)
    elif act_bits > 1:
        t = np.zeros(K) if T is None else np.asarray(T, np.float64)
        u = act_codes(X.reshape(-1, K), T, act_bits, act_scale)
        C, U = u @ b, u.sum(axis=1, keepdims=True)  # exact integers
        Y = float(np.float32(act_scale)) * (P * C + Q * U) + t @ (b * P + Q)
    else:
        t = np.zeros(K) if T is None else np.asarray(T, np.float64)
        s = np.where(x >= t, 1, -1).astype(np.int64)
        D1 = s @ b  # exact integers
        D0 = s.sum(axis=1, keepdims=True)
        kappa = np.abs(x - t).mean(axis=1, keepdims=True)
        Y = kappa * (P * D1 + Q * D0) + t @ (b * P + Q)
    if B is not None:
        Y = Y + np.asarray(B, np.float64)
    return Y.reshape(*X.shape[:-1], N).astype(np.float32)


def _check_t(T, n: int, B, mode: str) -> None:
    if T is None:
        return
    if mode != "full":
        raise ValueError("T (centering) applies to mode 'full' only")
    if B is None:
        raise ValueError("T needs the bias input B (zeros if the layer has none)")
    if np.asarray(T).dtype != np.float32 or np.shape(T) != (n,):
        raise ValueError(f"T must be float32 [{n}], got {list(np.shape(T))}")


def conv_bits(Wbits: np.ndarray, C: int, kh: int, kw: int) -> np.ndarray:
    """b [M, C, kh, kw] (int64 0/1) of BinaryConv's packed weight."""
    M, Cp = Wbits.shape[0], padded(C)
    b = unpack_bits(Wbits, kh * kw * Cp).reshape(M, kh, kw, Cp)[..., :C]
    return np.ascontiguousarray(b.transpose(0, 3, 1, 2)).astype(np.int64)


def windows(xp: np.ndarray, kh: int, kw: int, OH: int, OW: int, strides, dilations) -> np.ndarray:
    """[N, C, kh, kw, OH, OW] views of the padded input at every tap."""
    sh, sw = strides
    dh, dw = dilations
    taps = [
        [
            xp[:, :, dy * dh : dy * dh + sh * (OH - 1) + 1 : sh, dx * dw : dx * dw + sw * (OW - 1) + 1 : sw]
            for dx in range(kw)
        ]
        for dy in range(kh)
    ]
    return np.stack([np.stack(row, axis=2) for row in taps], axis=2)


def binary_conv(
    X: np.ndarray,
    Wbits: np.ndarray,
    S: np.ndarray,
    B: np.ndarray | None = None,
    *,
    C: int,
    kernel_shape,
    strides=(1, 1),
    pads=(0, 0, 0, 0),
    dilations=(1, 1),
    weights: str = "sign",
    T: np.ndarray | None = None,
    act_bits: int = 1,
    act_scale: float | None = None,
) -> np.ndarray:
    """Y [N, M, OH, OW] of BinaryConv (module docstring); float64 arithmetic, float32 out."""
    X, Wbits, S = np.asarray(X), np.asarray(Wbits), np.asarray(S)
    _check_t(T, C, B, "full")
    _check_act(act_bits, act_scale)
    kh, kw = (int(k) for k in kernel_shape)
    M = Wbits.shape[0] if Wbits.ndim == 2 else -1
    if Wbits.dtype != np.uint8 or Wbits.ndim != 2 or Wbits.shape[1] != kh * kw * padded(C) // 8:
        raise ValueError(
            f"Wbits must be uint8 [M, {kh * kw * padded(C) // 8}], got {Wbits.dtype} {list(Wbits.shape)}"
        )
    _check_s(S, M, weights)
    if X.ndim != 4 or X.shape[1] != C:
        raise ValueError(f"X must have shape [N, {C}, H, W], got {list(X.shape)}")
    if B is not None and np.shape(B) != (M,):
        raise ValueError(f"B must have shape [{M}], got {list(np.shape(B))}")
    top, left, bottom, right = (int(p) for p in pads)
    H, W = X.shape[2:]
    OH = (H + top + bottom - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    OW = (W + left + right - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    t = np.zeros((1, C, 1, 1)) if T is None else np.asarray(T, np.float64).reshape(1, C, 1, 1)
    pad = ((0, 0), (0, 0), (top, bottom), (left, right))
    x = np.pad(X.astype(np.float64) - t, pad)
    inside = np.pad(np.ones((1, 1, H, W)), pad)
    b = conv_bits(Wbits, C, kh, kw)
    P, Q = pq(S, weights)
    if act_bits > 1:  # codes of the image, pad 0
        u = np.pad(
            act_codes(X, None if T is None else np.asarray(T).reshape(1, C, 1, 1), act_bits, act_scale), pad
        )
        ws = windows(u, kh, kw, OH, OW, strides, dilations)
        kappa = np.full((X.shape[0], OH, OW), float(np.float32(act_scale)))
    else:
        s = np.where(x >= 0, 1, -1).astype(np.int64) * inside.astype(np.int64)  # pad: 0
        ws = windows(s, kh, kw, OH, OW, strides, dilations)  # [N, C, kh, kw, OH, OW]
        kappa = windows(np.abs(x), kh, kw, OH, OW, strides, dilations).sum(axis=(1, 2, 3)) / (kh * kw * C)
    D1 = np.einsum("ncyxhw,mcyx->nmhw", ws, b)  # exact integers (k-bit: C; signs: D1)
    D0 = ws.sum(axis=(1, 2, 3))[:, None]  # (k-bit: U; signs: D0)
    Wt = b * P[:, None, None, None] + Q[:, None, None, None]
    tw = np.einsum("ncyxhw,mcyx->nmhw", windows(inside * t, kh, kw, OH, OW, strides, dilations), Wt)
    Y = kappa[:, None] * (P[None, :, None, None] * D1 + Q[None, :, None, None] * D0) + tw
    if B is not None:
        Y = Y + np.asarray(B, np.float64)[None, :, None, None]
    return Y.astype(np.float32)


MATMUL_SPEC = OpSpec(
    name="BinaryMatMul",
    summary="Y = X W + B with W one bit per weight and a per-output scale; activations float (partial), "
    "binarized with a per-row scale (full, XNOR-popcount) or k-bit codes (full, act_bits k, bit-serial)",
    inputs=[
        ("X", "float32 [..., K]"),
        (
            "Wbits",
            "uint8 [N, Kp / 8], constant; bit k of row n is b[k, n], Kp = K rounded up to 64, pad bits 0",
        ),
        ("S", "float32 [N, 1] (weights=sign: alpha) or [N, 2] (weights=01: a, c), constant"),
        ("B", "float32 [N], constant, optional; bias"),
        (
            "T",
            "float32 [K], constant, optional (mode full, with B); centering: x binarized as sign(x - T); "
            "act_bits >= 2: the bottom of the codes' range",
        ),
    ],
    outputs=[("Y", "float32 [..., N]")],
    attributes=[
        ("K", "int, input features"),
        ("N", "int, output features"),
        ("mode", "string, 'partial' (float activations) or 'full' (binarized activations)"),
        ("weights", "string, 'sign' (W = alpha (2b - 1)) or '01' (W = a b + c)"),
        ("act_bits", "int, mode full: 1 (default, sign activations, XNOR) or k in 2..8 (k-bit codes)"),
        ("act_scale", "float > 0, act_bits >= 2: the step s of the codes (top clip T + s (2^k - 1))"),
    ],
    constraints=[
        "Wbits, S, B constant initializers",
        "bit layout: see onnxopt/reference/binary.py",
        "act_bits >= 2: mode full, act_scale required; T optional (the bottom of the range)",
    ],
    formula="""
W[k, n] = P[n] b[k, n] + Q[n]   (sign: P = 2 S0, Q = -S0;  01: P = S0, Q = S1)
partial: Y[n] = P[n] sum_{b=1} x[k] + Q[n] sum_k x[k] + B[n]
full:    a = [x >= 0], kappa = mean |x|,
         Y[n] = kappa (P[n] (2 popcount(a & b_n) - popcount(b_n)) + Q[n] (2 popcount(a) - K)) + B[n]
         with T: a = [x >= T], kappa = mean |x - T|, and Y[n] += sum_k T[k] W[k, n]
full, act_bits = k >= 2 (DoReFa-style, bit-serial): u = clamp(rint((x - T) r), 0, 2^k - 1) in float32 with
         r = float32(1 / s), ties to even; a_i bit i of u,
         Y[n] = s (P[n] sum_i 2^i popcount(a_i & b_n) + Q[n] sum_i 2^i popcount(a_i))
                + sum_k T[k] W[k, n] + B[n]
""",
    reference=binary_matmul,
)

CONV_SPEC = OpSpec(
    name="BinaryConv",
    summary="Conv (NCHW, group 1) with binarized weights and activations (XNOR-Net) or k-bit activations "
    "(act_bits), AND-popcount over channel-packed bits, pad acting as 0",
    inputs=[
        ("X", "float32 [N, C, H, W]"),
        ("Wbits", "uint8 [M, kh kw Cp / 8], constant; bit (dy kw + dx) Cp + c of row m is b[m, c, dy, dx]"),
        ("S", "float32 [M, 1] (weights=sign) or [M, 2] (weights=01), constant"),
        ("B", "float32 [M], constant, optional; bias"),
        (
            "T",
            "float32 [C], constant, optional (with B); centering: x binarized as sign(x - T[c]); "
            "act_bits >= 2: the bottom of the codes' range",
        ),
    ],
    outputs=[("Y", "float32 [N, M, OH, OW]")],
    attributes=[
        ("C", "int, input channels"),
        ("kernel_shape", "ints [kh, kw]"),
        ("strides", "ints [sh, sw], default 1"),
        ("pads", "ints [top, left, bottom, right], default 0"),
        ("dilations", "ints [dh, dw], default 1"),
        ("weights", "string, 'sign' or '01'"),
        ("act_bits", "int, 1 (default, sign activations, XNOR) or k in 2..8 (k-bit codes)"),
        ("act_scale", "float > 0, act_bits >= 2: the step s of the codes"),
    ],
    constraints=[
        "Wbits, S, B constant initializers",
        "Cp = C rounded up to 64, padded bits 0",
        "act_bits >= 2: act_scale required, kh kw Cp (2^k - 1) < 2^31",
    ],
    formula="""
per output pixel, over the taps inside the image (pad acts as 0), s = sign(x) in {-1, +1}:
  D1[m] = sum_{b[m]=1} s,  D0 = sum s,  kappa = sum |x| / (kh kw C)
  Y[m] = kappa (P[m] D1[m] + Q[m] D0) + B[m]
with T: s = sign(x - T[c]), kappa from |x - T[c]|, Y[m] += sum over valid taps, c of T[c] W[m, c, tap]
act_bits = k >= 2: u = clamp(rint((x - T[c]) r), 0, 2^k - 1) (float32, r = float32(1 / s); pad: 0), bit planes
  a_i, over the field
  Y[m] = s (P[m] sum_i 2^i popcount(a_i & b_m) + Q[m] sum_i 2^i popcount(a_i)) + (T W over valid taps) + B[m]
""",
    reference=binary_conv,
)


class BinaryMatMul(OpRun):
    """onnx.reference evaluator for BinaryMatMul (domain onnxopt)."""

    op_domain = "onnxopt"

    def _run(
        self,
        X,
        Wbits,
        S,
        B=None,
        T=None,
        K=None,
        N=None,
        mode=None,
        weights=None,
        act_bits=None,
        act_scale=None,
    ):
        kw = dict(K=K, N=N, mode=mode or "full", weights=weights or "sign", T=T)
        kw.update(act_bits=act_bits or 1, act_scale=act_scale)
        return (binary_matmul(X, Wbits, S, B, **kw),)


class BinaryConv(OpRun):
    """onnx.reference evaluator for BinaryConv (domain onnxopt)."""

    op_domain = "onnxopt"

    def _run(
        self,
        X,
        Wbits,
        S,
        B=None,
        T=None,
        C=None,
        kernel_shape=None,
        strides=None,
        pads=None,
        dilations=None,
        weights=None,
        act_bits=None,
        act_scale=None,
    ):
        return (
            binary_conv(
                X,
                Wbits,
                S,
                B,
                C=C,
                kernel_shape=kernel_shape,
                strides=strides or (1, 1),
                pads=pads or (0, 0, 0, 0),
                dilations=dilations or (1, 1),
                weights=weights or "sign",
                T=T,
                act_bits=act_bits or 1,
                act_scale=act_scale,
            ),
        )
