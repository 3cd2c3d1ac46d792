"""BinaryMatMul and BinaryConv kernels: the C++ ops in onnxruntime against the numpy reference (partial and
full modes, sign and {0,1} weights, K and C not multiples of 64, odd N and M, batches, strides, dilations,
asymmetric pads, kernels 1x1 to 5x5, both builds, 1 and 2 threads); the integer part compared exactly (every
output within round-off of the reference, far below one popcount step); bit packing; bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxopt
from onnxopt.reference import REFERENCE_OPS, SPECS
from onnxopt.reference.binary import (
    binary_conv,
    binary_matmul,
    conv_bits,
    matmul_bits,
    pack_bits,
    padded,
    pq,
    unpack_bits,
)

F32 = np.float32


def scales(rows: int, weights: str, rng) -> np.ndarray:
    cols = 1 if weights == "sign" else 2
    return (rng.random((rows, cols), dtype=F32) + 0.25) * np.array([1, -0.5][:cols], F32)


def matmul_weights(K: int, N: int, weights: str, bias: bool, seed: int):
    rng = np.random.default_rng(seed)
    b = np.zeros((N, padded(K)), np.uint8)
    b[:, :K] = rng.integers(0, 2, (N, K))
    B = rng.standard_normal(N, dtype=F32) if bias else None
    return pack_bits(b), scales(N, weights, rng), B


def conv_weights(M: int, C: int, kh: int, kw: int, weights: str, bias: bool, seed: int):
    rng = np.random.default_rng(seed)
    b = np.zeros((M, kh, kw, padded(C)), np.uint8)
    b[..., :C] = rng.integers(0, 2, (M, kh, kw, C))
    B = rng.standard_normal(M, dtype=F32) if bias else None
    return pack_bits(b.reshape(M, -1)), scales(M, weights, rng), B


def make_model(op: str, Wbits, S, B, x_shape, attrs: dict, inputs_w: bool = False, T=None) -> bytes:
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    inits = [numpy_helper.from_array(S, "S")]
    if inputs_w:
        inputs.append(helper.make_tensor_value_info("Wbits", TensorProto.UINT8, list(Wbits.shape)))
    else:
        inits.append(numpy_helper.from_array(Wbits, "Wbits"))
    names = ["X", "Wbits", "S"]
    if B is not None:
        inits.append(numpy_helper.from_array(B, "B"))
        names.append("B")
    if T is not None:
        inits.append(numpy_helper.from_array(T, "T"))
        names += ["", "T"] if B is None else ["T"]
    node = helper.make_node(op, names, ["Y"], domain="onnxopt", name="bin", **attrs)
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnxopt", 1)], ir_version=10
    )
    return model.SerializeToString()


def assert_exact_integers(Y: np.ndarray, Y_ref: np.ndarray, step: np.ndarray, what: str) -> None:
    """Every output within fp32 round-off of the reference: far below `step`, the change of one output that
    one popcount off by one would make, so the integer parts agree exactly."""
    err = np.abs(Y.astype(np.float64) - Y_ref)
    tol = 1e-5 * (np.abs(Y_ref) + np.abs(Y_ref).max())  # the sums of |x| round at the scale of the largest
    assert np.all(err <= tol), (
        f"{what}: max error {err.max():.3g}, worst index {np.unravel_index(err.argmax(), err.shape)}"
    )
    assert np.all(tol < 0.05 * step), f"{what}: tolerance not below one popcount step"


def test_pack_round_trip():
    b = np.random.default_rng(0).integers(0, 2, (5, 128), dtype=np.uint8)
    W = pack_bits(b)
    assert W.shape == (5, 16) and W[0, 0] == int("".join(map(str, b[0, 7::-1])), 2)
    np.testing.assert_array_equal(unpack_bits(W, 128), b)


# (K, N, leading shape, mode, weights, bias)
MM_CASES = [
    (64, 8, (1,), "full", "sign", True),
    (100, 13, (1,), "full", "sign", False),  # K padded to 128, N odd
    (300, 67, (3,), "full", "01", True),  # several tasks of 64 columns
    (1030, 5, (2, 3), "full", "sign", True),  # more than 31 AVX2 words (byte-count flush)
    (4200, 9, (1,), "full", "01", False),
    (64, 8, (1,), "partial", "sign", True),
    (100, 13, (5,), "partial", "01", True),  # rows in blocks of 4 and a tail
    (257, 70, (1,), "partial", "sign", False),
    (96, 3, (2, 2), "partial", "01", False),
]


def mm_describe(c) -> str:
    K, N, lead, mode, weights, bias = c
    return f"K={K},N={N},lead={list(lead)},{mode},{weights},bias={bias}"


BUILDS = {"best": {}, "avx2": {"ONNXOPT_DISABLE_AVX512": "1"}, "portable": {"ONNXOPT_DISABLE_AVX2": "1"}}


def use_build(build: str, monkeypatch) -> None:
    """The kernels the op picks at creation: the best this CPU runs (AVX-512 VPOPCNTDQ for BinaryConv's count
    loop where present), AVX2, or portable."""
    for key, value in BUILDS[build].items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("case", MM_CASES, ids=[mm_describe(c) for c in MM_CASES])
def test_matmul_matches_reference(case, build, monkeypatch):
    K, N, lead, mode, weights, bias = case
    Wbits, S, B = matmul_weights(K, N, weights, bias, seed=K + N)
    rng = np.random.default_rng(K)
    X = rng.standard_normal((*lead, K), dtype=F32)
    X.reshape(-1)[::7] = 0.0  # x = 0 binarizes to +1 in both
    use_build(build, monkeypatch)
    what = f"{mm_describe(case)} build={build}"
    kw = dict(K=K, N=N, mode=mode, weights=weights)
    Y_ref = binary_matmul(X, Wbits, S, B, **kw).astype(np.float64)
    P, Q = pq(S, weights)
    W = matmul_bits(Wbits, K) * P + Q  # the weight the bits stand for
    x = X.reshape(-1, K).astype(np.float64)
    if mode == "partial":
        dense = x @ W
        step = np.full(Y_ref.shape, np.inf)
    else:
        kappa = np.abs(x).mean(axis=1, keepdims=True)
        dense = kappa * (np.where(x >= 0, 1.0, -1.0) @ W)
        step = np.broadcast_to(2 * kappa * np.abs(P), dense.shape).reshape(Y_ref.shape)
    dense = dense + (0.0 if B is None else B)
    np.testing.assert_allclose(Y_ref.reshape(-1, N), dense, rtol=1e-5, atol=1e-5, err_msg=what)
    model = make_model("BinaryMatMul", Wbits, S, B, [*(f"d{i}" for i in range(len(lead))), K], kw)
    for threads in (1, 2):
        (Y,) = onnxopt.make_session(model, threads=threads).run(None, {"X": X})
        assert Y.shape == (*lead, N) and Y.dtype == F32, what
        if mode == "full":
            assert_exact_integers(Y, Y_ref, step, f"{what} threads={threads}")
        else:
            np.testing.assert_allclose(Y, Y_ref, rtol=1e-4, atol=1e-4 * np.abs(Y_ref).max(), err_msg=what)


# (N, C, H, W, M, kernel, strides, pads, dilations, weights, bias)
CONV_CASES = [
    (1, 64, 9, 7, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "sign", True),
    (1, 13, 9, 7, 15, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "sign", False),  # C padded to 64, M % 4 = 3
    (3, 70, 8, 9, 6, (3, 3), (2, 2), (1, 0, 2, 1), (1, 1), "01", True),  # batch, stride 2, asymmetric pads
    (1, 130, 11, 10, 9, (3, 3), (1, 1), (0, 0, 0, 0), (2, 2), "sign", True),  # dilation, cw 3
    (2, 5, 6, 6, 4, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), "01", False),  # 5x5, field mostly padding
    (1, 600, 5, 6, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "sign", True),  # 90 words: byte-count flushes
    (1, 32, 7, 7, 12, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), "sign", True),  # 1x1
    (1, 16, 7, 5, 5, (1, 3), (1, 2), (0, 1, 0, 1), (1, 1), "01", True),  # rectangular kernel
    # Wider than 16 (AVX-512 packing: blocks of 16 pixels and a tail), output rows of several 8-pixel blocks
    # and a tail, M = 20 (two filter groups and a padded one), C = 100 (half-filled second word), 37 rows
    # (chunks of 3 rows whose packed windows overlap).
    (1, 100, 37, 41, 20, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "sign", True),
    # Stride 2 and dilation over several chunks; pads past the field: the first output row and the last
    # output column read padding only.
    (2, 33, 35, 19, 9, (3, 3), (2, 2), (5, 0, 2, 4), (2, 1), "01", True),
]


def conv_describe(c) -> str:
    n, C, H, W, M, k, s, p, d, weights, bias = c
    return f"N={n},C={C},{H}x{W},M={M},k={list(k)},s={list(s)},p={list(p)},d={list(d)},{weights},bias={bias}"


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("case", CONV_CASES, ids=[conv_describe(c) for c in CONV_CASES])
def test_conv_matches_reference(case, build, monkeypatch):
    n, C, H, W, M, k, s, p, d, weights, bias = case
    Wbits, S, B = conv_weights(M, C, *k, weights, bias, seed=C + M)
    rng = np.random.default_rng(C)
    X = rng.standard_normal((n, C, H, W), dtype=F32)
    X.reshape(-1)[::5] = 0.0
    use_build(build, monkeypatch)
    what = f"{conv_describe(case)} build={build}"
    attrs = dict(C=C, kernel_shape=list(k), strides=list(s), pads=list(p), dilations=list(d), weights=weights)
    Y_ref = binary_conv(X, Wbits, S, B, **attrs).astype(np.float64)
    # The reference against a float convolution of the sign maps (pad 0) with the weight the bits stand for.
    P, Q = pq(S, weights)
    Wf = conv_bits(Wbits, C, *k) * P[:, None, None, None] + Q[:, None, None, None]
    sx = np.where(X >= 0, 1.0, -1.0).astype(F32)
    conv = onnx.helper.make_node(
        "Conv", ["X", "W"], ["Y"], kernel_shape=list(k), strides=list(s), pads=list(p), dilations=list(d)
    )
    (sign_conv,) = ReferenceEvaluator(conv).run(None, {"X": sx.astype(np.float64), "W": Wf})
    ones = np.ones((1, C, *k))
    (box,) = ReferenceEvaluator(conv).run(None, {"X": np.abs(X).astype(np.float64), "W": ones / ones.size})
    dense = box * sign_conv + (0.0 if B is None else B[None, :, None, None])
    np.testing.assert_allclose(Y_ref, dense, rtol=1e-6, atol=1e-6, err_msg=what)
    step = 2 * box * np.abs(P)[None, :, None, None]
    model = make_model("BinaryConv", Wbits, S, B, ["n", C, H, W], attrs)
    for threads in (1, 2):
        (Y,) = onnxopt.make_session(model, threads=threads).run(None, {"X": X})
        assert Y.shape == Y_ref.shape and Y.dtype == F32, what
        assert_exact_integers(Y, Y_ref, step + (step == 0), f"{what} threads={threads}")


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize(("K", "N", "weights"), [(100, 13, "sign"), (1030, 70, "01")])
def test_matmul_centering(K, N, weights, build, monkeypatch):
    """mode full with T: x binarized around T (post-ReLU inputs), the constant T W added."""
    Wbits, S, B = matmul_weights(K, N, weights, True, seed=K)
    rng = np.random.default_rng(N)
    X = np.maximum(rng.standard_normal((3, K), dtype=F32), 0)
    T = (0.4 * rng.random(K)).astype(F32)
    X[0, :5] = T[:5]  # x = T binarizes to +1 in both
    use_build(build, monkeypatch)
    kw = dict(K=K, N=N, mode="full", weights=weights)
    Y_ref = binary_matmul(X, Wbits, S, B, **kw, T=T).astype(np.float64)
    P, Q = pq(S, weights)
    W = matmul_bits(Wbits, K) * P + Q
    x = X.astype(np.float64) - T
    kappa = np.abs(x).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(
        Y_ref, kappa * (np.where(x >= 0, 1.0, -1.0) @ W) + T @ W + B, rtol=1e-5, atol=1e-5
    )
    (Y,) = onnxopt.make_session(make_model("BinaryMatMul", Wbits, S, B, [3, K], kw, T=T)).run(None, {"X": X})
    assert_exact_integers(Y, Y_ref, np.broadcast_to(2 * kappa * np.abs(P), Y.shape), f"K={K} build={build}")


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize(
    "case", [CONV_CASES[2], CONV_CASES[4], CONV_CASES[8]], ids=["stride2", "5x5", "wide"]
)
def test_conv_centering(case, build, monkeypatch):
    """BinaryConv with T: binarized around T[c]; the constant T W summed over the taps inside the image."""
    n, C, H, W, M, k, s, p, d, weights, _ = case
    Wbits, S, B = conv_weights(M, C, *k, weights, True, seed=C)
    rng = np.random.default_rng(M)
    X = np.maximum(rng.standard_normal((n, C, H, W), dtype=F32), 0)
    T = (0.5 * rng.random(C)).astype(F32)
    use_build(build, monkeypatch)
    attrs = dict(C=C, kernel_shape=list(k), strides=list(s), pads=list(p), dilations=list(d), weights=weights)
    Y_ref = binary_conv(X, Wbits, S, B, **attrs, T=T).astype(np.float64)
    P, Q = pq(S, weights)
    Wf = conv_bits(Wbits, C, *k) * P[:, None, None, None] + Q[:, None, None, None]
    conv = onnx.helper.make_node(
        "Conv", ["X", "W"], ["Y"], kernel_shape=list(k), strides=list(s), pads=list(p), dilations=list(d)
    )
    xc = X.astype(np.float64) - T[None, :, None, None]
    (sign_conv,) = ReferenceEvaluator(conv).run(None, {"X": np.where(xc >= 0, 1.0, -1.0), "W": Wf})
    ones = np.ones((1, C, *k))
    (box,) = ReferenceEvaluator(conv).run(None, {"X": np.abs(xc), "W": ones / ones.size})
    (t_conv,) = ReferenceEvaluator(conv).run(
        None, {"X": np.broadcast_to(T[None, :, None, None], X.shape) * 1.0, "W": Wf}
    )
    np.testing.assert_allclose(Y_ref, box * sign_conv + t_conv + B[None, :, None, None], rtol=1e-6, atol=1e-6)
    (Y,) = onnxopt.make_session(make_model("BinaryConv", Wbits, S, B, list(X.shape), attrs, T=T)).run(
        None, {"X": X}
    )
    step = 2 * box * np.abs(P)[None, :, None, None]
    assert_exact_integers(Y, Y_ref, step + (step == 0), f"{case} build={build}")


def test_reference_evaluator_and_specs():
    Wbits, S, B = matmul_weights(70, 6, "01", True, 3)
    X = np.random.default_rng(0).standard_normal((2, 70), dtype=F32)
    model = onnx.load_from_string(
        make_model("BinaryMatMul", Wbits, S, B, [2, 70], dict(K=70, N=6, mode="full", weights="01"))
    )
    (Y,) = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, {"X": X})
    np.testing.assert_array_equal(Y, binary_matmul(X, Wbits, S, B, K=70, N=6, mode="full", weights="01"))
    assert SPECS["BinaryMatMul"].reference is binary_matmul and SPECS["BinaryConv"].reference is binary_conv
    assert "popcount" in SPECS["BinaryConv"].describe()


def run_error(model: bytes, feeds: dict) -> str:
    with pytest.raises(Exception) as e:
        onnxopt.make_session(model).run(None, feeds)
    return str(e.value)


def test_matmul_bad_input():
    Wbits, S, B = matmul_weights(100, 7, "sign", True, 1)
    X = np.zeros((1, 100), F32)
    good = dict(K=100, N=7, mode="full", weights="sign")
    assert "Wbits must have shape [7, 16]" in run_error(
        make_model("BinaryMatMul", Wbits[:, :8], S, B, [1, 100], good), {"X": X}
    )
    bad = Wbits.copy()
    bad[2, 15] = 0x80  # bit 127 >= K
    assert "padding bit 127" in run_error(make_model("BinaryMatMul", bad, S, B, [1, 100], good), {"X": X})
    msg = run_error(make_model("BinaryMatMul", Wbits, S, B, ["m", "k"], good), {"X": np.zeros((1, 99), F32)})
    assert "K = 100" in msg
    assert "S must have shape [7, 2]" in run_error(
        make_model("BinaryMatMul", Wbits, S, B, [1, 100], {**good, "weights": "01"}), {"X": X}
    )
    assert "'mode'" in run_error(
        make_model("BinaryMatMul", Wbits, S, B, [1, 100], {**good, "mode": "xnor"}), {"X": X}
    )
    assert "constant" in run_error(
        make_model("BinaryMatMul", Wbits, S, B, [1, 100], good, inputs_w=True), {"X": X, "Wbits": Wbits}
    )
    T = np.zeros(100, F32)
    partial = {**good, "mode": "partial"}
    assert "'full' only" in run_error(
        make_model("BinaryMatMul", Wbits, S, B, [1, 100], partial, T=T), {"X": X}
    )
    assert "T must have shape [K] = [100]" in run_error(
        make_model("BinaryMatMul", Wbits, S, B, [1, 100], good, T=T[:99]), {"X": X}
    )
    assert "needs the bias" in run_error(
        make_model("BinaryMatMul", Wbits, S, None, [1, 100], good, T=T), {"X": X}
    )


def test_conv_bad_input():
    Wbits, S, B = conv_weights(4, 10, 3, 3, "sign", False, 2)
    attrs = dict(C=10, kernel_shape=[3, 3], pads=[1, 1, 1, 1], weights="sign")
    X = np.zeros((1, 10, 5, 5), F32)
    msg = run_error(
        make_model("BinaryConv", Wbits, S, B, ["n", "c", 5, 5], attrs), {"X": np.zeros((1, 9, 5, 5), F32)}
    )
    assert "C = 10" in msg
    assert "Wbits must have shape [4, 72]" in run_error(
        make_model("BinaryConv", Wbits[:, :64], S, B, [1, 10, 5, 5], attrs), {"X": X}
    )
    bad = Wbits.copy()
    bad[0, 2] = 0x01  # bit 16: channel 16 >= C of tap 0
    assert "padding bit 16" in run_error(make_model("BinaryConv", bad, S, B, [1, 10, 5, 5], attrs), {"X": X})
    assert "group" in run_error(
        make_model("BinaryConv", Wbits, S, B, [1, 10, 5, 5], {**attrs, "group": 2}), {"X": X}
    )
    small = {**attrs, "pads": [0, 0, 0, 0]}
    assert "smaller than" in run_error(
        make_model("BinaryConv", Wbits, S, B, [1, 10, "h", "w"], small), {"X": np.zeros((1, 10, 2, 2), F32)}
    )
