"""LowBitConv kernel: the C++ op in onnxruntime against the numpy reference over 2, 3 and 4 bits, group sizes
32 to 128, C kh kw not a multiple of the group (padded codes), odd channel counts and spatial sizes, strides,
pads, dilations, the in-place 1x1 path, batches 1 and 3, both builds and 1 and 2 threads; an exact case
(integer codes, inputs and power-of-two scales: no rounding anywhere); run-time and creation-time errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxopt
from onnxopt.reference import REFERENCE_OPS, SPECS
from onnxopt.reference.lowbit import conv_nchw, dequantize, lowbit_conv, pack_codes, padded_k
from tolerances import REL_L2, rel_l2

F32 = np.float32
TOL = REL_L2[np.dtype(F32)]


def weights(K: int, M: int, bits: int, G: int, bias: bool, seed: int = 0):
    """Random codes, scales, zero points (Q, S, Z, B) of M filters over K = C kh kw inputs."""
    rng = np.random.default_rng(seed)
    Kp = padded_k(K, G)
    q = rng.integers(0, 1 << bits, (Kp, M), dtype=np.uint8)
    S = (rng.random((M, Kp // G), dtype=F32) + 0.5) / np.sqrt(K, dtype=F32)
    Z = rng.integers(0, 1 << bits, (M, Kp // G), dtype=np.uint8)
    B = rng.standard_normal(M, dtype=F32) if bias else None
    return pack_codes(q, bits), S, Z, B


def make_model(
    Q, S, Z, B, C, M, kernel, bits, G, strides=None, pads=None, dilations=None, **override
) -> bytes:
    """One-node graph Y = LowBitConv(X, Q, S, Z[, B])."""
    attrs = dict(C=C, M=M, kernel_shape=list(kernel), bits=bits, group_size=G, strides=strides, pads=pads)
    attrs.update(dilations=dilations, **override)
    attrs = {k: v for k, v in attrs.items() if v is not None}
    inits = [numpy_helper.from_array(a, n) for n, a in (("Q", Q), ("S", S), ("Z", Z))]
    names = ["X", "Q", "S", "Z"]
    if B is not None:
        inits.append(numpy_helper.from_array(B, "B"))
        names.append("B")
    node = helper.make_node("LowBitConv", names, ["Y"], domain="onnxopt", name="lbc", **attrs)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", "c", "h", "w"])
    graph = helper.make_graph(
        [node], "g", [x], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnxopt", 1)], ir_version=10
    )
    return model.SerializeToString()


# (N, C, H, W, M, kernel, strides, pads, dilations, bits, G, bias)
CASES = [
    (1, 13, 9, 7, 15, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, 32, True),  # K = 117 -> 128
    (3, 13, 9, 7, 15, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3, 64, False),
    (1, 8, 11, 10, 9, (3, 3), (2, 2), (1, 0, 2, 1), (1, 1), 2, 32, True),  # stride 2, uneven pads
    (2, 5, 12, 13, 7, (3, 2), (1, 2), (0, 1, 0, 1), (2, 1), 4, 32, True),  # dilation, stride 1 x 2
    (1, 40, 6, 9, 17, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 4, 32, True),  # 1x1 read in place, P = 54
    (3, 64, 5, 5, 12, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 3, 64, False),
    (1, 33, 7, 7, 8, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 2, 32, True),  # strided 1x1: im2col path
    (1, 1, 28, 28, 16, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 4, 32, True),  # K = 25 < one group
    (1, 32, 14, 14, 64, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, 128, True),  # several K blocks, 8 panels
    (1, 20, 3, 4, 5, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 3, 32, True),  # kernel wider than the input
]


def describe(case) -> str:
    N, C, H, W, M, k, s, p, d, bits, G, bias = case
    return f"X={N}x{C}x{H}x{W} M={M} k={k} s={s} p={p} d={d} bits={bits} G={G} bias={bias}"


@pytest.mark.parametrize("portable", [False, True], ids=["avx2", "portable"])
@pytest.mark.parametrize("case", CASES, ids=[describe(c).replace(" ", ",") for c in CASES])
def test_kernel_matches_reference(case, portable, monkeypatch):
    N, C, H, W, M, kernel, strides, pads, dil, bits, G, bias = case
    K = C * kernel[0] * kernel[1]
    Q, S, Z, B = weights(K, M, bits, G, bias, seed=K + M)
    X = np.random.default_rng(K).standard_normal((N, C, H, W), dtype=F32)
    if portable:
        monkeypatch.setenv("ONNXOPT_DISABLE_AVX2", "1")  # read when the kernel is created
    what = f"{describe(case)} portable={portable}"
    kw = dict(
        C=C, M=M, kernel_shape=kernel, strides=strides, pads=pads, dilations=dil, bits=bits, group_size=G
    )
    Y_ref = lowbit_conv(X, Q, S, Z, B, **kw)
    A = dequantize(Q, S, Z, K, bits, G).T.reshape(M, C, *kernel)
    Y_dense = conv_nchw(X, A, strides, pads, dil) + (0.0 if B is None else B[None, :, None, None])
    assert rel_l2(Y_ref, Y_dense) <= 1e-7, what
    model = make_model(Q, S, Z, B, C, M, kernel, bits, G, list(strides), list(pads), list(dil))
    for threads in (1, 2):
        (Y,) = onnxopt.make_session(model, threads=threads).run(None, {"X": X})
        assert Y.shape == Y_ref.shape and Y.dtype == F32, f"{what}: shape {Y.shape}"
        err = rel_l2(Y, Y_ref)
        assert err <= TOL, f"{what} threads={threads}: rel L2 {err:.3e}"


@pytest.mark.parametrize("portable", [False, True], ids=["avx2", "portable"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_exact_integer_codes(bits, portable, monkeypatch):
    """Integer inputs and codes with scales 1/2 and 1/4: every product and partial sum is exact in float32, so
    the kernel must equal the reference bit for bit (a wrong code, zero or pixel cannot hide in a tolerance).
    """
    if portable:
        monkeypatch.setenv("ONNXOPT_DISABLE_AVX2", "1")
    rng = np.random.default_rng(bits)
    C, M, G = 7, 11, 32
    K = C * 9
    Kp = padded_k(K, G)
    q = rng.integers(0, 1 << bits, (Kp, M), dtype=np.uint8)
    S = rng.choice(np.array([0.5, 0.25], F32), (M, Kp // G))
    Z = rng.integers(0, 1 << bits, (M, Kp // G), dtype=np.uint8)
    B = rng.integers(-4, 5, M).astype(F32)
    X = rng.integers(-3, 4, (2, C, 10, 9)).astype(F32)
    Q = pack_codes(q, bits)
    kw = dict(C=C, M=M, kernel_shape=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), bits=bits, group_size=G)
    Y_ref = lowbit_conv(X, Q, S, Z, B, **kw)
    model = make_model(Q, S, Z, B, C, M, (3, 3), bits, G, pads=[1, 1, 1, 1])
    (Y,) = onnxopt.make_session(model, threads=2).run(None, {"X": X})
    np.testing.assert_array_equal(Y, Y_ref, err_msg=f"bits={bits} portable={portable}")


def test_round_off_after_scaling_matches_float64():
    """Scales far from 1 (1e-3 and 1e3 in one layer): the float32 kernel stays within round-off of float64."""
    C, M, G, bits = 16, 9, 32, 4
    Q, S, Z, B = weights(C * 9, M, bits, G, True, 5)
    S[::2] *= 1e-3
    S[1::2] *= 1e3
    X = np.random.default_rng(5).standard_normal((1, C, 8, 8), dtype=F32)
    kw = dict(C=C, M=M, kernel_shape=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), bits=bits, group_size=G)
    model = make_model(Q, S, Z, B, C, M, (3, 3), bits, G, pads=[1, 1, 1, 1])
    (Y,) = onnxopt.make_session(model).run(None, {"X": X})
    Y_ref = lowbit_conv(X, Q, S, Z, B, **kw)
    for m in range(M):  # per filter: the small-scale filters are not hidden by the large ones
        assert rel_l2(Y[:, m], Y_ref[:, m]) <= TOL, f"filter {m} scale {S[m, 0]:.3g}"


def test_reference_evaluator_and_spec():
    Q, S, Z, B = weights(6 * 9, 5, 4, 32, True, 3)
    X = np.random.default_rng(3).standard_normal((2, 6, 5, 6), dtype=F32)
    model = make_model(Q, S, Z, B, 6, 5, (3, 3), 4, 32, pads=[1, 1, 1, 1])
    (Y_ev,) = ReferenceEvaluator(onnx.load_from_string(model), new_ops=REFERENCE_OPS).run(None, {"X": X})
    (Y,) = onnxopt.make_session(model).run(None, {"X": X})
    assert rel_l2(Y, Y_ev) <= TOL
    spec = SPECS["LowBitConv"]
    assert spec.reference is lowbit_conv and "kernel_shape" in spec.describe()


def test_run_time_errors_are_clear_and_the_session_survives():
    Q, S, Z, B = weights(6 * 9, 5, 4, 32, True, 1)
    sess = onnxopt.make_session(make_model(Q, S, Z, B, 6, 5, (3, 3), 4, 32))
    rng = np.random.default_rng(1)
    with pytest.raises(Exception, match=r"X has 7 channels .* weight has C = 6"):
        sess.run(None, {"X": rng.standard_normal((1, 7, 8, 8), dtype=F32)})
    with pytest.raises(Exception, match=r"kernel does not fit the padded input"):
        sess.run(None, {"X": rng.standard_normal((1, 6, 2, 8), dtype=F32)})
    X = rng.standard_normal((1, 6, 8, 8), dtype=F32)
    (Y,) = sess.run(None, {"X": X})
    kw = dict(C=6, M=5, kernel_shape=(3, 3), bits=4, group_size=32)
    assert rel_l2(Y, lowbit_conv(X, Q, S, Z, B, **kw)) <= TOL
    (Y0,) = sess.run(None, {"X": np.zeros((0, 6, 8, 8), F32)})
    assert Y0.shape == (0, 5, 6, 6)


CREATION_ERRORS = [
    pytest.param(dict(bits=5), r"'bits' must be in \[2, 4\], got 5", id="bits-5"),
    pytest.param(dict(C=None), r"'C' is required", id="C-missing"),
    pytest.param(dict(C=8), r"Q must have shape \[5, 48\], got \[5, 32\]", id="C-vs-Q"),
    pytest.param(dict(kernel_shape=[3]), r"'kernel_shape' must be 2 ints", id="kernel-1d"),
    pytest.param(dict(strides=[0, 1]), r"'strides' must be 2 ints", id="stride-0"),
    pytest.param(dict(pads=[1, 1]), r"'pads' must have 4 values", id="pads-2"),
    pytest.param(dict(B=np.ones(4, F32)), r"B must have shape \[M\] = \[5\]", id="B-length"),
]


@pytest.mark.parametrize(("kwargs", "message"), CREATION_ERRORS)
def test_creation_errors_are_clear(kwargs, message):
    kwargs = dict(kwargs)
    Q, S, Z, B = weights(6 * 9, 5, 4, 32, True, 2)
    B = kwargs.pop("B", B)
    args = dict(C=kwargs.pop("C", 6), bits=kwargs.pop("bits", 4), kernel=kwargs.pop("kernel_shape", (3, 3)))
    with pytest.raises(Exception, match=message) as info:
        onnxopt.make_session(make_model(Q, S, Z, B, args["C"], 5, args["kernel"], args["bits"], 32, **kwargs))
    assert "LowBitConv node 'lbc'" in str(info.value), str(info.value)
