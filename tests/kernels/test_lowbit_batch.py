"""LowBitMatMul with more than one input row (custom_ops/lowbit_gemm*.cc): the batched GEMMs against the numpy
reference in the three builds (AVX-512 VNNI where the CPU has it, AVX2, portable), float and int8 activations,
odd row counts (2 to 64: remainders of the row blocks, the few-row and the tile float paths), K not a multiple
of the group, N not a multiple of 4 or 32, with and without bias, wide layers cut into K slabs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.reference.lowbit import lowbit_matmul, pack_codes, padded_k
from tolerances import REL_L2, rel_l2

F32 = np.float32
TOL = REL_L2[np.dtype(F32)]
BUILDS = {"best": {}, "avx2": {"ONNXOPT_DISABLE_AVX512": "1"}, "portable": {"ONNXOPT_DISABLE_AVX2": "1"}}

# (K, N, bits, G, rows, bias)
CASES = [
    (100, 13, 4, 32, 2, True),  # K padded to 128, N odd
    (257, 67, 4, 64, 3, False),  # N % 4 = 3
    (384, 37, 4, 128, 5, True),
    (300, 70, 4, 96, 17, True),  # 3 chunks per group; 2 row vectors + 1 row
    (520, 33, 4, 32, 64, False),  # tasks of 32 columns + 1; K blocks of 128 + 8
    (200, 21, 3, 64, 17, True),
    (130, 70, 2, 32, 5, False),
    (5000, 9, 4, 96, 3, True),  # two K slabs (4032 + 968 inputs): slab starts inside a 128-k tile
    (1280, 9, 4, 256, 9, True),  # 8 chunks per group: the AVX2 16-bit sums at their widest
    (4500, 6, 4, 96, 16, False),  # two K slabs through the dequantized tiles (16 rows and more)
    (96, 11, 4, 32, 300, True),  # passes of 64 (int8) and 256 (float) rows
]


def weights(K: int, N: int, bits: int, G: int, bias: bool, seed: int):
    """Random codes, scales, zero points and bias (Q, S, Z, B) of a K x N layer."""
    rng = np.random.default_rng(seed)
    Kp = padded_k(K, G)
    S = (rng.random((N, Kp // G), dtype=F32) + 0.5) / np.sqrt(K, dtype=F32)
    Z = rng.integers(0, 1 << bits, (N, Kp // G), dtype=np.uint8)
    Q = pack_codes(rng.integers(0, 1 << bits, (Kp, N), dtype=np.uint8), bits)
    return Q, S, Z, rng.standard_normal(N, dtype=F32) if bias else None


def make_model(Q, S, Z, B, K, N, bits, G, x_shape=None, act_bits=0) -> bytes:
    """One-node graph Y = LowBitMatMul(X, Q, S, Z[, B]), X of shape x_shape (default [M, K])."""
    inits = [
        numpy_helper.from_array(a, name)
        for a, name in ((Q, "Q"), (S, "S"), (Z, "Z"), (B, "B"))
        if a is not None
    ]
    attrs = dict(K=K, N=N, bits=bits, group_size=G, act_bits=act_bits)
    node = helper.make_node(
        "LowBitMatMul", ["X", "Q", "S", "Z"] + ["B"] * (B is not None), ["Y"], domain="onnxopt", **attrs
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape or ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("onnxopt", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def describe(case) -> str:
    K, N, bits, G, rows, bias = case
    return f"K={K},N={N},bits={bits},G={G},rows={rows},bias={bias}"


def run(model: bytes, X: np.ndarray, build: str, monkeypatch, threads: int) -> np.ndarray:
    for key, value in BUILDS[build].items():
        monkeypatch.setenv(key, value)  # read when the kernel is created
    (Y,) = onnxopt.make_session(model, threads=threads).run(None, {"X": X})
    return Y


# act_bits = 8 runs with 4-bit codes only
CASES_ACT = [(c, a) for c in CASES for a in (0, 8) if a == 0 or c[2] == 4]
ACT_IDS = [f"{describe(c)},act_bits={a}" for c, a in CASES_ACT]


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize(("case", "act_bits"), CASES_ACT, ids=ACT_IDS)
def test_batch_matches_reference(case, act_bits, build, monkeypatch):
    K, N, bits, G, rows, bias = case
    Q, S, Z, B = weights(K, N, bits, G, bias, seed=K + N + rows)
    X = np.random.default_rng(rows).standard_normal((rows, K), dtype=F32)
    kw = dict(K=K, N=N, bits=bits, group_size=G)
    Y_ref = lowbit_matmul(X, Q, S, Z, B, **kw, act_bits=act_bits)
    model = make_model(Q, S, Z, B, K, N, bits, G, act_bits=act_bits)
    for threads in (1, 2):
        Y = run(model, X, build, monkeypatch, threads)
        assert Y.shape == (rows, N) and Y.dtype == F32
        err = rel_l2(Y, Y_ref)
        assert err <= TOL, (
            f"{describe(case)} act_bits={act_bits} build={build} threads={threads}: rel L2 {err:.3e}"
        )


@pytest.mark.parametrize("build", list(BUILDS))
def test_batch_leading_dims_and_rows_agree_with_batch_1(build, monkeypatch):
    """X [2, 3, K] is 6 rows; each row of the batched result equals that row run alone (the batch-1 path)."""
    K, N, G = 192, 19, 64
    Q, S, Z, B = weights(K, N, 4, G, True, seed=5)
    X = np.random.default_rng(5).standard_normal((2, 3, K), dtype=F32)
    for act_bits in (0, 8):
        model = make_model(Q, S, Z, B, K, N, 4, G, x_shape=["a", "b", K], act_bits=act_bits)
        Y = run(model, X, build, monkeypatch, 2)
        assert Y.shape == (2, 3, N)
        for i in range(2):
            for j in range(3):
                Y1 = run(model, X[i : i + 1, j : j + 1], build, monkeypatch, 1)
                err = rel_l2(Y[i, j], Y1[0, 0])
                assert err <= TOL, f"act_bits={act_bits} build={build} row ({i}, {j}): rel L2 {err:.3e}"


@pytest.mark.parametrize("build", list(BUILDS))
def test_batch_int8_is_exact_on_integer_inputs(build, monkeypatch):
    """Rows of integers with max |x| = 127 (row scale 1, exact int8 codes), integer weights, scales 1: every
    product and sum is an exact integer, so the batched integer GEMM equals the reference bit for bit (row 1,
    with max |x| = 2.5, is scaled: within round-off)."""
    rng = np.random.default_rng(11)
    K, N, G, rows = 200, 23, 32, 13
    Kp = 224
    q = rng.integers(0, 16, (Kp, N), dtype=np.uint8)
    S = np.ones((N, Kp // G), F32)
    Z = rng.integers(0, 16, (N, Kp // G), dtype=np.uint8)
    X = rng.integers(-127, 128, (rows, K)).astype(F32)
    X[:, 0] = 127.0
    X[1] = np.arange(K, dtype=F32) % 6 - 2.5
    Q = pack_codes(q, 4)
    Y_ref = lowbit_matmul(X, Q, S, Z, None, K=K, N=N, bits=4, group_size=G, act_bits=8)
    Y = run(make_model(Q, S, Z, None, K, N, 4, G, act_bits=8), X, build, monkeypatch, 2)
    np.testing.assert_array_equal(Y[[0, *range(2, rows)]], Y_ref[[0, *range(2, rows)]], err_msg=build)
    assert rel_l2(Y[1], Y_ref[1]) <= TOL, build


@pytest.mark.parametrize("build", list(BUILDS))
def test_batch_int8_non_finite_row_is_an_error(build, monkeypatch):
    Q, S, Z, B = weights(64, 6, 4, 32, True, 1)
    for key, value in BUILDS[build].items():
        monkeypatch.setenv(key, value)
    sess = onnxopt.make_session(make_model(Q, S, Z, B, 64, 6, 4, 32, act_bits=8))
    X = np.ones((5, 64), F32)
    X[3, 7] = np.inf
    with pytest.raises(Exception, match="non-finite value"):
        sess.run(None, {"X": X})
    X[3, 7] = 0.0
    X[2] = 0.0  # an all-zero row among others: y = bias
    (Y,) = sess.run(None, {"X": X})
    np.testing.assert_allclose(Y[2], B, rtol=1e-6)
