"""LowBitMatMul kernel: the C++ op in onnxruntime against the numpy reference over 2, 3 and 4 bits, group
sizes 32 to 128, K not a multiple of the group (padded), odd N, batches 1, 3 and 17 (the batch-1 and tiled
paths), every build (AVX-512, AVX2, portable) and 1 and 2 threads; act_bits = 8; the code packing round
trip; run-time and creation-time errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxopt
from onnxopt.reference import REFERENCE_OPS, SPECS
from onnxopt.reference.lowbit import dequantize, lowbit_matmul, pack_codes, padded_k, unpack_codes
from tolerances import REL_L2, rel_l2

F32 = np.float32
TOL = REL_L2[np.dtype(F32)]

# Settings read at kernel creation: the best build this CPU runs (AVX-512 VNNI for the act_bits = 8 loop where
# present), the AVX2 build, the portable build.
BUILDS = {"best": {}, "avx2": {"ONNXOPT_DISABLE_AVX512": "1"}, "portable": {"ONNXOPT_DISABLE_AVX2": "1"}}


def use_build(build: str, monkeypatch) -> None:
    for key in ("ONNXOPT_DISABLE_AVX512", "ONNXOPT_DISABLE_AVX2"):
        monkeypatch.delenv(key, raising=False)
    for key, value in BUILDS[build].items():
        monkeypatch.setenv(key, value)


def weights(K: int, N: int, bits: int, G: int, bias: bool, seed: int = 0):
    """Random codes, scales, zero points (Q, S, Z, B) of a K x N layer."""
    rng = np.random.default_rng(seed)
    Kp = padded_k(K, G)
    q = rng.integers(0, 1 << bits, (Kp, N), dtype=np.uint8)
    S = (rng.random((N, Kp // G), dtype=F32) + 0.5) / np.sqrt(K, dtype=F32)
    Z = rng.integers(0, 1 << bits, (N, Kp // G), dtype=np.uint8)
    B = rng.standard_normal(N, dtype=F32) if bias else None
    return pack_codes(q, bits), S, Z, B


def make_model(Q, S, Z, B, K, N, bits, G, x_shape=None, inputs_q=False, **override) -> bytes:
    """One-node graph Y = LowBitMatMul(X, Q, S, Z[, B])."""
    attrs = dict(K=K, N=N, bits=bits, group_size=G)
    attrs.update(override)
    attrs = {k: v for k, v in attrs.items() if v is not None}
    x_shape = ["M", K] if x_shape is None else x_shape
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    inits = [numpy_helper.from_array(S, "S"), numpy_helper.from_array(Z, "Z")]
    if inputs_q:
        inputs.append(helper.make_tensor_value_info("Q", TensorProto.UINT8, list(Q.shape)))
    else:
        inits.append(numpy_helper.from_array(Q, "Q"))
    names = ["X", "Q", "S", "Z"]
    if B is not None:
        inits.append(numpy_helper.from_array(B, "B"))
        names.append("B")
    node = helper.make_node("LowBitMatMul", names, ["Y"], domain="onnxopt", name="lb", **attrs)
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnxopt", 1)], ir_version=10
    )
    return model.SerializeToString()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_round_trip(bits):
    q = np.random.default_rng(bits).integers(0, 1 << bits, (96, 5), dtype=np.uint8)
    Q = pack_codes(q, bits)
    assert Q.shape == (5, 96 * bits // 8)
    np.testing.assert_array_equal(unpack_codes(Q, bits), q)


def test_pack_layout_4bit():
    """Byte j of a 4-bit chunk holds q[j] (low nibble) and q[j + 16] (high): what the AVX2 path unpacks."""
    q = np.arange(32, dtype=np.uint8)[:, None] % 16
    Q = pack_codes(q, 4)
    assert Q[0, 0] == (0 | 0 << 4) and Q[0, 1] == (1 | 1 << 4) and Q[0, 15] == (15 | 15 << 4)


# (K, N, bits, G, leading shape, bias)
CASES = [
    (64, 8, 4, 32, (1,), True),
    (100, 13, 4, 32, (1,), True),  # K padded to 128, N odd
    (100, 13, 4, 32, (3,), False),
    (257, 67, 4, 64, (1,), True),  # several batch-1 tasks, N % 4 = 3
    (257, 67, 4, 64, (17,), True),
    (384, 131, 4, 128, (2, 5), False),
    (96, 9, 3, 32, (1,), True),
    (200, 21, 3, 64, (3,), True),
    (200, 21, 3, 64, (17,), False),
    (96, 9, 2, 32, (1,), True),
    (130, 70, 2, 32, (3,), True),
    (1000, 33, 2, 128, (17,), True),
    (4500, 7, 4, 128, (1,), True),  # batch 1 in two K slabs (4096 x values each)
    (5000, 6, 3, 32, (1,), False),
    (8192, 1024, 4, 128, (1,), True),  # 4 MiB of codes: on 2 MiB pages (AllocateCodes), two K slabs
]


def describe(case) -> str:
    K, N, bits, G, lead, bias = case
    return f"K={K} N={N} bits={bits} G={G} lead={list(lead)} bias={bias}"


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("case", CASES, ids=[describe(c).replace(" ", ",") for c in CASES])
def test_kernel_matches_reference(case, build, monkeypatch):
    K, N, bits, G, lead, bias = case
    Q, S, Z, B = weights(K, N, bits, G, bias, seed=K + N)
    X = np.random.default_rng(K).standard_normal((*lead, K), dtype=F32)
    use_build(build, monkeypatch)  # read when the kernel is created
    what = f"{describe(case)} build={build}"
    kw = dict(K=K, N=N, bits=bits, group_size=G)
    Y_ref = lowbit_matmul(X, Q, S, Z, B, **kw)
    Y_dense = X.astype(np.float64) @ dequantize(Q, S, Z, K, bits, G) + (0.0 if B is None else B)
    assert rel_l2(Y_ref, Y_dense) <= 1e-7, what
    model = make_model(Q, S, Z, B, K, N, bits, G, x_shape=[*(f"d{i}" for i in range(len(lead))), K])
    for threads in (1, 2):
        (Y,) = onnxopt.make_session(model, threads=threads).run(None, {"X": X})
        assert Y.shape == (*lead, N) and Y.dtype == F32, f"{what}: shape {Y.shape}"
        err = rel_l2(Y, Y_ref)
        assert err <= TOL, f"{what} threads={threads}: rel L2 {err:.3e}"


def test_reference_evaluator_and_spec():
    Q, S, Z, B = weights(70, 6, 4, 32, True, 3)
    X = np.random.default_rng(3).standard_normal((4, 70), dtype=F32)
    model = make_model(Q, S, Z, B, 70, 6, 4, 32)
    (Y_ev,) = ReferenceEvaluator(onnx.load_from_string(model), new_ops=REFERENCE_OPS).run(None, {"X": X})
    (Y,) = onnxopt.make_session(model).run(None, {"X": X})
    assert rel_l2(Y, Y_ev) <= TOL
    spec = SPECS["LowBitMatMul"]
    assert spec.reference is lowbit_matmul and "group_size" in spec.describe()


def test_run_time_errors_are_clear_and_the_session_survives():
    Q, S, Z, B = weights(40, 5, 4, 32, True, 1)
    proto = onnx.load_from_string(make_model(Q, S, Z, B, 40, 5, 4, 32))
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    sess = onnxopt.make_session(proto.SerializeToString())
    rng = np.random.default_rng(1)
    with pytest.raises(Exception, match=r"X has last dimension 39 .* K = 40"):
        sess.run(None, {"X": rng.standard_normal((2, 39), dtype=F32)})
    with pytest.raises(Exception, match="rank >= 1"):
        sess.run(None, {"X": np.array(1.0, F32)})
    X = rng.standard_normal((1, 40), dtype=F32)
    (Y,) = sess.run(None, {"X": X})
    assert rel_l2(Y, lowbit_matmul(X, Q, S, Z, B, K=40, N=5, bits=4, group_size=32)) <= TOL
    (Y0,) = sess.run(None, {"X": np.zeros((0, 40), F32)})
    assert Y0.shape == (0, 5)


def _bad_z():
    Z = np.zeros((5, 2), np.uint8)
    Z[1, 1] = 16
    return Z


CREATION_ERRORS = [
    pytest.param(dict(bits=5), r"'bits' must be in \[2, 4\], got 5", id="bits-5"),
    pytest.param(dict(bits=None), r"'bits' is required", id="bits-missing"),
    pytest.param(dict(group_size=48), r"'group_size' must be a multiple of 32", id="group-48"),
    pytest.param(dict(group_size=16), r"'group_size' must be in \[32", id="group-16"),
    pytest.param(dict(K=0), r"'K' must be in \[1", id="K-0"),
    pytest.param(dict(K=100), r"Q must have shape \[5, 64\], got \[5, 32\]", id="K-vs-Q"),
    pytest.param(dict(N=6), r"Q must have shape \[6, 32\]", id="N-vs-Q"),
    pytest.param(dict(inputs_q=True), r"Q \(input 1, 'Q'\) must be a constant initializer", id="Q-input"),
    pytest.param(
        dict(S=np.ones((5, 3), F32)), r"S must have shape \[N, ceil\(K / group_size\)\]", id="S-shape"
    ),
    pytest.param(dict(S=np.full((5, 2), np.inf, F32)), r"S\[0\] is not finite", id="S-inf"),
    pytest.param(dict(Z=_bad_z()), r"Z\[3\] = 16 is not a 4-bit code", id="Z-range"),
    # onnxruntime checks input types against the op's schema before the kernel exists
    pytest.param(
        dict(Z=np.zeros((5, 2), np.int8)),
        r"tensor\(int8\).* \(Z\) of operator \(LowBitMatMul\)",
        id="Z-dtype",
    ),
    pytest.param(dict(B=np.ones(4, F32)), r"B must have shape \[N\] = \[5\]", id="B-length"),
]


@pytest.mark.parametrize(("kwargs", "message"), CREATION_ERRORS)
def test_creation_errors_are_clear(kwargs, message):
    kwargs = dict(kwargs)
    Q0, S0, Z0, B0 = weights(40, 5, 4, 32, True, 2)
    Q, S, Z, B = (kwargs.pop(k, v) for k, v in (("Q", Q0), ("S", S0), ("Z", Z0), ("B", B0)))
    args = dict(K=40, N=5, bits=4, G=32)
    for key in ("K", "N", "bits"):
        if key in kwargs:
            args[key] = kwargs.pop(key)
    if "group_size" in kwargs:
        args["G"] = kwargs.pop("group_size")
    with pytest.raises(Exception, match=message) as info:
        onnxopt.make_session(
            make_model(Q, S, Z, B, args["K"], args["N"], args["bits"], args["G"], x_shape=["M", 40], **kwargs)
        )
    assert "LowBitMatMul node 'lb'" in str(info.value) or "(LowBitMatMul)" in str(info.value), str(info.value)


# act_bits = 8 (bits 4): (K, N, G, leading shape, bias)
I8_CASES = [
    (64, 8, 32, (1,), True),
    (100, 13, 32, (1,), True),  # K padded, N odd
    (257, 67, 64, (3,), False),  # rows one by one through the integer path
    (384, 131, 128, (1,), True),
    (4500, 7, 128, (1,), True),  # two K slabs
    (1280, 9, 256, (2,), True),  # 8 chunks per group: AVX2's 16-bit partial sums at their widest
    (200, 10, 96, (1,), False),  # 3 chunks per group: AVX-512's odd chunk after the pairs
    (140000, 5, 131072, (1,), True),  # 4096 chunks per group: AVX-512 folds its high-nibble sums twice
    (8192, 1024, 128, (1,), False),  # 4 MiB of codes: on 2 MiB pages, two K slabs, 16 tasks
]


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize(
    "case", I8_CASES, ids=[f"K={c[0]},N={c[1]},G={c[2]},lead={list(c[3])}" for c in I8_CASES]
)
def test_int8_activations_match_their_reference(case, build, monkeypatch):
    """act_bits = 8: the reference models the activation quantization; the kernel's integer dot products are
    exact, so it matches within float32 round-off of the scaling (and stays near the float path)."""
    K, N, G, lead, bias = case
    Q, S, Z, B = weights(K, N, 4, G, bias, seed=K + N)
    X = np.random.default_rng(K).standard_normal((*lead, K), dtype=F32)
    use_build(build, monkeypatch)
    kw = dict(K=K, N=N, bits=4, group_size=G)
    Y_ref = lowbit_matmul(X, Q, S, Z, B, **kw, act_bits=8)
    assert 1e-4 < rel_l2(Y_ref, lowbit_matmul(X, Q, S, Z, B, **kw)) < 0.05  # int8 rows: ~1% off, not 0
    model = make_model(Q, S, Z, B, K, N, 4, G, x_shape=[*(f"d{i}" for i in range(len(lead))), K], act_bits=8)
    for threads in (1, 2):
        (Y,) = onnxopt.make_session(model, threads=threads).run(None, {"X": X})
        err = rel_l2(Y, Y_ref)
        assert err <= TOL, f"{case} build={build} threads={threads}: rel L2 {err:.3e}"


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("G", [32, 96])
def test_int8_activation_codes_are_exact(G, build, monkeypatch):
    """Rows whose int8 codes are exact (x = integers up to 127, so the row scale is 1) and integer weights:
    every product and sum is exact, so the kernel equals the reference bit for bit."""
    rng = np.random.default_rng(9)
    K, N = 3 * G, 11
    q = rng.integers(0, 16, (K, N), dtype=np.uint8)
    S = np.ones((N, K // G), F32)
    Z = rng.integers(0, 16, (N, K // G), dtype=np.uint8)
    X = rng.integers(-127, 128, (3, K)).astype(F32)
    X[:, 0] = 127.0  # max |x| = 127: the row scale is exactly 1
    Q = pack_codes(q, 4)
    Y_ref = lowbit_matmul(X, Q, S, Z, None, K=K, N=N, bits=4, group_size=G, act_bits=8)
    np.testing.assert_array_equal(Y_ref, X.astype(np.float64) @ (q.astype(np.float64) - Z.T.repeat(G, 0)))
    use_build(build, monkeypatch)
    (Y,) = onnxopt.make_session(make_model(Q, S, Z, None, K, N, 4, G, act_bits=8)).run(None, {"X": X})
    np.testing.assert_array_equal(Y, Y_ref, err_msg=f"build={build} G={G}")


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("bad", [(3, np.nan), (5, -np.inf), (44, np.inf)], ids=["nan", "-inf", "inf-tail"])
def test_int8_activations_reject_non_finite(bad, build, monkeypatch):
    """Found in the vectorized max |x| scan and in its scalar tail (K = 45)."""
    use_build(build, monkeypatch)
    Q, S, Z, B = weights(45, 5, 4, 32, True, 1)
    sess = onnxopt.make_session(make_model(Q, S, Z, B, 45, 5, 4, 32, act_bits=8))
    X = np.ones((1, 45), F32)
    X[0, bad[0]] = bad[1]
    with pytest.raises(Exception, match="non-finite value"):
        sess.run(None, {"X": X})


def test_int8_activations_errors():
    Q, S, Z, B = weights(40, 5, 4, 32, True, 1)
    with pytest.raises(Exception, match=r"'act_bits' must be 0 or 8, got 4"):
        onnxopt.make_session(make_model(Q, S, Z, B, 40, 5, 4, 32, act_bits=4))
    Q2, S2, Z2, B2 = weights(40, 5, 2, 32, True, 1)
    with pytest.raises(Exception, match=r"act_bits = 8 needs bits = 4"):
        onnxopt.make_session(make_model(Q2, S2, Z2, B2, 40, 5, 2, 32, act_bits=8))
    sess = onnxopt.make_session(make_model(Q, S, Z, B, 40, 5, 4, 32, act_bits=8))
    X = np.zeros((2, 40), F32)
    X[1, 3] = np.nan
    with pytest.raises(Exception, match="non-finite value"):
        sess.run(None, {"X": X})
    (Y,) = sess.run(None, {"X": np.zeros((1, 40), F32)})  # an all-zero row: codes 0, y = bias
    np.testing.assert_allclose(Y[0], B, rtol=1e-6)
