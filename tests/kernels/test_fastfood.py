"""FastfoodMatMul kernel: the C++ op in onnxruntime against the numpy reference and against the dense matrix
the stack expands to, over n (16, 64, 1024, 4096), depths 1 and 2, odd K and N below n, leading batch
shapes, both builds and 1 and 2 threads; plus run-time and creation-time errors and the onnx reference
evaluator."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxopt
from onnxopt.reference import REFERENCE_OPS, SPECS
from onnxopt.reference.fastfood import dense_weight, fastfood_matmul
from tolerances import REL_L2_FWHT, rel_l2

F32 = np.float32


def weights(d: int, n: int, N: int, bias: bool, seed: int = 0):
    """(B, G, S, P, bias) of a random stack; S scaled by 1/n so each block keeps the norm of its input."""
    rng = np.random.default_rng(seed)
    B = rng.choice(np.array([-1.0, 1.0], F32), (d, n))
    G = rng.standard_normal((d, n), dtype=F32)
    S = rng.standard_normal((d, n), dtype=F32) / F32(n)
    P = np.stack([rng.permutation(n) for _ in range(d)]).astype(np.int64)
    b = rng.standard_normal(N, dtype=F32) if bias else None
    return B, G, S, P, b


def make_model(B, G, S, P, bias, K, N, x_shape=None, g_as_input=False, attrs=None) -> bytes:
    """One-node graph Y = FastfoodMatMul(X, B, G, S, P[, bias]); X [..., K] with a symbolic leading shape."""
    x_shape = ["M", K] if x_shape is None else x_shape
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    inits = [
        numpy_helper.from_array(B, "B"),
        numpy_helper.from_array(S, "S"),
        numpy_helper.from_array(P, "P"),
    ]
    if g_as_input:
        inputs.append(helper.make_tensor_value_info("G", TensorProto.FLOAT, list(G.shape)))
    else:
        inits.append(numpy_helper.from_array(G, "G"))
    names = ["X", "B", "G", "S", "P"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        names.append("bias")
    attrs = {"in_features": K, "out_features": N} if attrs is None else attrs
    node = helper.make_node("FastfoodMatMul", names, ["Y"], domain="onnxopt", name="ff", **attrs)
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnxopt", 1)], ir_version=10
    )
    return model.SerializeToString()


# (n, d, K, N, leading shape, bias)
CASES = [
    (16, 1, 16, 16, (1,), True),
    (16, 2, 13, 9, (2, 5), False),
    (64, 1, 50, 64, (3,), True),
    (64, 2, 64, 33, (1,), False),
    (1024, 1, 1000, 777, (2, 5), True),
    (1024, 2, 1024, 1024, (3,), False),
    (4096, 1, 4096, 4096, (1,), True),
    (4096, 2, 3000, 4001, (3,), True),
    (4, 2, 3, 4, (20,), True),  # n below the radix-8 step: the plain butterfly loop
]


def describe(case) -> str:
    n, d, K, N, lead, bias = case
    return f"n={n} d={d} K={K} N={N} lead={list(lead)} bias={bias}"


@pytest.mark.parametrize("portable", [False, True], ids=["avx2", "portable"])
@pytest.mark.parametrize("case", CASES, ids=[describe(c).replace(" ", ",") for c in CASES])
def test_kernel_matches_reference_and_dense(case, portable, monkeypatch):
    n, d, K, N, lead, has_bias = case
    B, G, S, P, bias = weights(d, n, N, has_bias, seed=n + d)
    X = np.random.default_rng(n * d).standard_normal((*lead, K), dtype=F32)
    if portable:
        monkeypatch.setenv("ONNXOPT_DISABLE_AVX2", "1")  # read when the kernel is created
    what = f"{describe(case)} portable={portable}"
    Y_ref = fastfood_matmul(X, B, G, S, P, bias, K, N)
    if n <= 1024:  # the dense expansion costs K n log n per identity row: skipped for the largest n
        W = dense_weight(B, G, S, P, K, N)
        Y_dense = X.astype(np.float64) @ W + (0.0 if bias is None else bias.astype(np.float64))
        assert rel_l2(Y_ref, Y_dense) <= 1e-6, f"{what}: numpy FWHT reference vs dense stack"
    model = make_model(B, G, S, P, bias, K, N, x_shape=[*(f"d{i}" for i in range(len(lead))), K])
    for threads in (1, 2):
        (Y,) = onnxopt.make_session(model, threads=threads).run(None, {"X": X})
        assert Y.shape == (*lead, N) and Y.dtype == F32, f"{what}: shape {Y.shape}"
        err = rel_l2(Y, Y_ref)
        assert err <= REL_L2_FWHT, f"{what} threads={threads}: vs reference rel L2 {err:.3e}"


def test_reference_evaluator_and_spec():
    B, G, S, P, bias = weights(2, 16, 12, True, 3)
    X = np.random.default_rng(3).standard_normal((4, 10), dtype=F32)
    model = make_model(B, G, S, P, bias, 10, 12)
    (Y_ev,) = ReferenceEvaluator(onnx.load_from_string(model), new_ops=REFERENCE_OPS).run(None, {"X": X})
    (Y,) = onnxopt.make_session(model).run(None, {"X": X})
    assert rel_l2(Y, Y_ev) <= REL_L2_FWHT
    spec = SPECS["FastfoodMatMul"]
    assert spec.reference is fastfood_matmul and "out_features" in spec.describe()


def test_run_time_errors_are_clear_and_the_session_survives():
    B, G, S, P, bias = weights(1, 16, 12, True, 1)
    proto = onnx.load_from_string(make_model(B, G, S, P, bias, 10, 12))
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    sess = onnxopt.make_session(proto.SerializeToString())
    rng = np.random.default_rng(1)
    with pytest.raises(Exception, match=r"X has last dimension 7 .* in_features K = 10"):
        sess.run(None, {"X": rng.standard_normal((2, 7), dtype=F32)})
    with pytest.raises(Exception, match="rank >= 1"):
        sess.run(None, {"X": np.array(1.0, F32)})
    X = rng.standard_normal((2, 10), dtype=F32)
    (Y,) = sess.run(None, {"X": X})
    assert rel_l2(Y, fastfood_matmul(X, B, G, S, P, bias, 10, 12)) <= REL_L2_FWHT
    (Y0,) = sess.run(None, {"X": np.zeros((0, 10), F32)})
    assert Y0.shape == (0, 12)


def _bad_perm():
    P = np.stack([np.arange(16)]).astype(np.int64)
    P[0, 3] = 5  # 5 twice, 3 never
    return P


CREATION_ERRORS = [
    pytest.param(dict(B=np.ones((1, 12), F32)), r"B must have shape \[d, n\] .* power of two", id="n-12"),
    pytest.param(dict(S=np.ones((2, 16), F32)), r"S must have shape \[d, n\] = \[1, 16\]", id="S-shape"),
    pytest.param(dict(P=_bad_perm()), r"P row 0 is not a permutation", id="P-not-perm"),
    pytest.param(dict(P=np.full((1, 16), 99, np.int64)), r"not a permutation", id="P-out-of-range"),
    # onnxruntime's own type check answers first for a P of the wrong type, naming the input and the node.
    pytest.param(dict(P=np.zeros((1, 16), np.int32)), r"tensor\(int32\).* \(P\)", id="P-int32"),
    pytest.param(dict(bias=np.ones(5, F32)), r"bias must have shape \[N\] = \[12\]", id="bias-length"),
    pytest.param(dict(g_as_input=True), r"G \(input 2, 'G'\) must be a constant initializer", id="G-input"),
    pytest.param(dict(attrs={"in_features": 10}), r"'out_features' \(N\) are required", id="no-N"),
    pytest.param(dict(attrs={"in_features": 10, "out_features": 17}), r"must be in \[1, n = 16\]", id="N>n"),
]


@pytest.mark.parametrize(("kwargs", "message"), CREATION_ERRORS)
def test_creation_errors_are_clear(kwargs, message):
    kwargs = dict(kwargs)
    B0, G0, S0, P0, b0 = weights(1, 16, 12, True, 2)
    B, G, S, P = (kwargs.pop(k, v) for k, v in (("B", B0), ("G", G0), ("S", S0), ("P", P0)))
    bias = kwargs.pop("bias", b0)
    with pytest.raises(Exception, match=message) as info:
        onnxopt.make_session(make_model(B, G, S, P, bias, 10, 12, **kwargs))
    text = str(info.value)
    assert "FastfoodMatMul" in text and "ff" in text, f"{kwargs}: {text}"
