"""BinaryMatMul and BinaryConv with k-bit activations (act_bits 2..8, DoReFa-style codes, bit-serial
AND-popcount): the codes, the reference against the dequantized float computation, and the C++ ops in
onnxruntime against the reference over odd shapes (K, C not multiples of 64, odd N and M, batches, strides,
dilations, asymmetric pads, 1x1 to 5x5), sign and {0,1} weights, with and without the offset T, every build
(AVX-512 VPOPCNTDQ, AVX2, portable) and 1 and 2 threads. The integer parts must agree exactly: every output
within a tenth of one count step s |P| of the reference. Bad attributes give clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

import onnxopt
from onnxopt.reference import REFERENCE_OPS
from onnxopt.reference.binary import act_codes, binary_conv, binary_matmul, conv_bits, matmul_bits, pq
from tests.kernels.test_binary import BUILDS, conv_weights, make_model, matmul_weights, run_error, use_build

F32 = np.float32


def test_codes_round_half_to_even_and_clamp():
    x = np.array([-1.0, 0.0, 0.25, 0.75, 1.0, 1.25, 100.0, np.inf, -np.inf], F32)
    np.testing.assert_array_equal(act_codes(x, None, 2, 0.5), [0, 0, 0, 2, 2, 2, 3, 3, 0])
    T = np.full(x.shape, -1.0, F32)
    np.testing.assert_array_equal(act_codes(x, T, 4, 0.5)[:4], [0, 2, 2, 4])


def assert_integer_parts(Y: np.ndarray, Y_ref: np.ndarray, step: np.ndarray, what: str) -> None:
    """Every output within a tenth of one count step of the reference (float32 round-off of the scaling is far
    below it), so every AND-popcount agrees exactly."""
    err = np.abs(Y.astype(np.float64) - Y_ref)
    ratio = err / step
    assert ratio.max() < 0.1, (
        f"{what}: error {ratio.max():.3g} steps at {np.unravel_index(ratio.argmax(), err.shape)}"
    )


def signed_input(shape, rng) -> np.ndarray:
    X = rng.standard_normal(shape, dtype=F32)
    X.reshape(-1)[::9] = 0.25  # exactly half a step (s = 0.5 below): ties round to even in both
    return X


# (K, N, leading shape, act_bits, weights, bias, offset T)
MM_CASES = [
    (64, 8, (1,), 2, "sign", True, False),
    (100, 13, (1,), 3, "sign", False, False),  # K padded to 128, N odd
    (300, 67, (3,), 4, "01", True, True),  # several tasks of 64 columns, T
    (1030, 5, (2, 3), 2, "sign", True, True),  # more than 31 AVX2 words (byte-count flush), AVX-512 tail
    (4200, 9, (1,), 4, "01", False, False),
    (200, 3, (5,), 8, "sign", True, False),
]


def mm_describe(c) -> str:
    K, N, lead, bits, weights, bias, offset = c
    return f"K={K},N={N},lead={list(lead)},a{bits},{weights},bias={bias},T={offset}"


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("case", MM_CASES, ids=[mm_describe(c) for c in MM_CASES])
def test_matmul_matches_reference(case, build, monkeypatch):
    K, N, lead, bits, weights, bias, offset = case
    Wbits, S, B = matmul_weights(K, N, weights, bias or offset, seed=K + N)
    rng = np.random.default_rng(K)
    X = signed_input((*lead, K), rng)
    T = (-rng.random(K)).astype(F32) if offset else None
    scale = 0.5 if bits < 8 else 0.02
    use_build(build, monkeypatch)
    what = f"{mm_describe(case)} build={build}"
    kw = dict(K=K, N=N, mode="full", weights=weights, act_bits=bits, act_scale=scale)
    Y_ref = binary_matmul(X, Wbits, S, B, **kw, T=T).astype(np.float64)
    # The reference is the float layer on the dequantized activations T + s u and weights P b + Q.
    P, Q = pq(S, weights)
    W = matmul_bits(Wbits, K) * P + Q
    t = 0.0 if T is None else T.astype(np.float64)
    xq = t + scale * act_codes(X.reshape(-1, K), T, bits, scale)
    dense = xq @ W + (0.0 if B is None else B)
    np.testing.assert_allclose(Y_ref.reshape(-1, N), dense, rtol=1e-6, atol=1e-5, err_msg=what)
    model = make_model("BinaryMatMul", Wbits, S, B, [*(f"d{i}" for i in range(len(lead))), K], kw, T=T)
    step = np.broadcast_to(scale * np.abs(P), Y_ref.shape)
    for threads in (1, 2):
        (Y,) = onnxopt.make_session(model, threads=threads).run(None, {"X": X})
        assert Y.shape == (*lead, N) and Y.dtype == F32, what
        assert_integer_parts(Y, Y_ref, step, f"{what} threads={threads}")


# (N, C, H, W, M, kernel, strides, pads, dilations, act_bits, weights, bias, offset T)
CONV_CASES = [
    (1, 64, 9, 7, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2, "sign", True, False),
    (1, 13, 9, 11, 15, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3, "sign", False, True),  # C padded, 8 + tail
    (3, 70, 8, 9, 6, (3, 3), (2, 2), (1, 0, 2, 1), (1, 1), 4, "01", True, True),  # batch, stride 2
    (1, 130, 11, 10, 20, (3, 3), (1, 1), (0, 0, 0, 0), (2, 2), 2, "sign", True, False),  # dilation, cw 3
    (2, 5, 6, 6, 4, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 3, "01", False, True),  # 5x5, field mostly pad
    (1, 600, 5, 6, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, "sign", True, False),  # byte-count flushes
    (1, 32, 7, 7, 12, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 2, "sign", True, False),  # 1x1
    (1, 16, 7, 5, 17, (1, 3), (1, 2), (0, 1, 0, 1), (1, 1), 4, "01", True, False),  # rectangular, stride 2
]


def conv_describe(c) -> str:
    n, C, H, W, M, k, s, p, d, bits, weights, bias, offset = c
    return (
        f"N={n},C={C},{H}x{W},M={M},k={list(k)},s={list(s)},p={list(p)},d={list(d)},a{bits},{weights},"
        f"bias={bias},T={offset}"
    )


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("case", CONV_CASES, ids=[conv_describe(c) for c in CONV_CASES])
def test_conv_matches_reference(case, build, monkeypatch):
    n, C, H, W, M, k, s, p, d, bits, weights, bias, offset = case
    Wbits, S, B = conv_weights(M, C, *k, weights, bias or offset, seed=C + M)
    rng = np.random.default_rng(C)
    X = signed_input((n, C, H, W), rng)
    T = (-rng.random(C)).astype(F32) if offset else None
    scale = 0.5
    use_build(build, monkeypatch)
    what = f"{conv_describe(case)} build={build}"
    attrs = dict(C=C, kernel_shape=list(k), strides=list(s), pads=list(p), dilations=list(d), weights=weights)
    attrs.update(act_bits=bits, act_scale=scale)
    Y_ref = binary_conv(X, Wbits, S, B, **attrs, T=T).astype(np.float64)
    # The reference against a zero-padded float convolution of the dequantized image T + s u.
    P, Q = pq(S, weights)
    Wf = conv_bits(Wbits, C, *k) * P[:, None, None, None] + Q[:, None, None, None]
    t = 0.0 if T is None else T.astype(np.float64).reshape(1, C, 1, 1)
    xq = t + scale * act_codes(X, None if T is None else T.reshape(1, C, 1, 1), bits, scale)
    conv = onnx.helper.make_node(
        "Conv", ["X", "W"], ["Y"], kernel_shape=list(k), strides=list(s), pads=list(p), dilations=list(d)
    )
    (dense,) = ReferenceEvaluator(conv).run(None, {"X": xq, "W": Wf})
    dense = dense + (0.0 if B is None else B[None, :, None, None])
    np.testing.assert_allclose(Y_ref, dense, rtol=1e-6, atol=1e-5, err_msg=what)
    model = make_model("BinaryConv", Wbits, S, B, ["n", C, H, W], attrs, T=T)
    step = np.broadcast_to(scale * np.abs(P)[None, :, None, None], Y_ref.shape)
    for threads in (1, 2):
        (Y,) = onnxopt.make_session(model, threads=threads).run(None, {"X": X})
        assert Y.shape == Y_ref.shape and Y.dtype == F32, what
        assert_integer_parts(Y, Y_ref, step, f"{what} threads={threads}")


def test_reference_evaluator():
    Wbits, S, B = conv_weights(6, 10, 3, 3, "sign", True, 4)
    attrs = dict(C=10, kernel_shape=[3, 3], pads=[1, 1, 1, 1], weights="sign", act_bits=3, act_scale=0.25)
    X = np.random.default_rng(1).standard_normal((1, 10, 5, 5), dtype=F32)
    model = onnx.load_from_string(make_model("BinaryConv", Wbits, S, B, [1, 10, 5, 5], attrs))
    (Y,) = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, {"X": X})
    np.testing.assert_array_equal(Y, binary_conv(X, Wbits, S, B, **attrs))


def test_bad_attributes():
    Wbits, S, B = matmul_weights(100, 7, "sign", True, 1)
    X = np.zeros((1, 100), F32)
    good = dict(K=100, N=7, mode="full", weights="sign", act_bits=2, act_scale=0.5)

    def mm_error(**change) -> str:
        return run_error(make_model("BinaryMatMul", Wbits, S, B, [1, 100], {**good, **change}), {"X": X})

    assert "'act_bits' must be in [1, 8]" in mm_error(act_bits=9)
    assert "'act_bits' must be in [1, 8]" in mm_error(act_bits=0)
    assert "needs mode 'full'" in mm_error(mode="partial")
    assert "'act_scale' must be finite and > 0" in mm_error(act_scale=-1.0)
    assert "'act_scale' must be finite and > 0" in mm_error(act_scale=0.0)
    assert "applies to act_bits >= 2 only" in mm_error(act_bits=1)
    no_scale = {k: v for k, v in good.items() if k != "act_scale"}
    assert "'act_scale' (the step" in run_error(
        make_model("BinaryMatMul", Wbits, S, B, [1, 100], no_scale), {"X": X}
    )
    Wc, Sc, Bc = conv_weights(4, 10, 3, 3, "sign", False, 2)
    attrs = dict(C=10, kernel_shape=[3, 3], weights="sign", act_bits=3, act_scale=float("nan"))
    msg = run_error(
        make_model("BinaryConv", Wc, Sc, Bc, [1, 10, 5, 5], attrs), {"X": np.zeros((1, 10, 5, 5), F32)}
    )
    assert "'act_scale' must be finite" in msg
    # K (2^8 - 1) over 2^31: the int32 counts would overflow
    K = (1 << 23) + (1 << 16)
    Wbig = np.zeros((1, K // 8), np.uint8)
    big = dict(K=K, N=1, mode="full", weights="sign", act_bits=8, act_scale=1.0)
    msg = run_error(make_model("BinaryMatMul", Wbig, S[:1], None, [1, K], big), {"X": np.zeros((1, K), F32)})
    assert "below 2^31" in msg
