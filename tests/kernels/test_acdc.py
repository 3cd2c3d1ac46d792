"""ACDCMatMul kernel: the C++ op in onnxruntime against the numpy reference and against the dense matrix W of
the stack expanded, over n (16, 64, 1024, 4096), depths 1 and 4, with and without permutations and bias,
leading batch shapes, both builds and 1 and 2 threads; plus run-time and creation-time errors and the onnx
reference evaluator."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxopt
from onnxopt.reference import REFERENCE_OPS, SPECS
from onnxopt.reference.acdc import acdc_matmul, dct_matrix, dense_weight
from tolerances import REL_L2_FFT, rel_l2

F32 = np.float32


def make_model(A, D, P=None, B=None, x_shape=None, a_as_input=False, skip_p=False) -> bytes:
    """One-node graph Y = ACDCMatMul(X, A, D[, P][, B]); X [..., n] with a symbolic leading shape. skip_p:
    P left out by name ('') while B is given."""
    x_shape = ["M", A.shape[-1]] if x_shape is None else x_shape
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    inits = [numpy_helper.from_array(D, "D")]
    if a_as_input:
        inputs.append(helper.make_tensor_value_info("A", TensorProto.FLOAT, list(A.shape)))
    else:
        inits.append(numpy_helper.from_array(A, "A"))
    names = ["X", "A", "D"]
    if P is not None:
        inits.append(numpy_helper.from_array(P, "P"))
        names.append("P")
    elif B is not None or skip_p:
        names.append("")
    if B is not None:
        inits.append(numpy_helper.from_array(B, "B"))
        names.append("B")
    node = helper.make_node("ACDCMatMul", names, ["Y"], domain="onnxopt", name="acdc")
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnxopt", 1)], ir_version=10
    )
    return model.SerializeToString()


def weights(L: int, n: int, perm: bool, out: int | None, seed: int = 0):
    """Diagonals near 1 (a depth-4 stack stays well conditioned), seeded permutations, a bias of `out`."""
    rng = np.random.default_rng(seed)
    A = (1 + 0.5 * rng.standard_normal((L, n))).astype(F32)
    D = (1 + 0.5 * rng.standard_normal((L, n))).astype(F32)
    P = np.stack([rng.permutation(n) for _ in range(L)]).astype(np.int64) if perm else None
    B = rng.standard_normal(out).astype(F32) if out is not None else None
    return A, D, P, B


# (n, L, leading shape, permutations, bias outputs N or None)
CASES = [
    (16, 1, (1,), False, None),
    (16, 4, (3,), True, 11),
    (64, 1, (2, 5), True, 64),
    (64, 4, (1,), True, 40),
    (1024, 1, (3,), True, 1000),
    (256, 2, (3,), False, None),
    (1024, 4, (2, 5), True, None),
    (4096, 1, (1,), True, 4000),
    (4096, 4, (3,), True, 4096),
]


def describe(case) -> str:
    n, L, lead, perm, out = case
    return f"n={n} L={L} lead={list(lead)} perm={perm} bias={out}"


def test_dct_matrix_is_orthonormal_dct_ii():
    for n in (2, 8, 64):
        C = dct_matrix(n)
        np.testing.assert_allclose(C @ C.T, np.eye(n), atol=1e-12)
        x = np.random.default_rng(n).standard_normal(n)
        k = 3 % n  # one coefficient by the DCT-II sum itself
        s = np.sqrt((1.0 if k == 0 else 2.0) / n)
        want = s * sum(x[i] * np.cos(np.pi * (2 * i + 1) * k / (2 * n)) for i in range(n))
        assert abs((C @ x)[k] - want) < 1e-12


@pytest.mark.parametrize("portable", [False, True], ids=["avx2", "portable"])
@pytest.mark.parametrize("case", CASES, ids=[describe(c).replace(" ", ",") for c in CASES])
def test_kernel_matches_reference_and_dense(case, portable, monkeypatch):
    n, L, lead, perm, out = case
    A, D, P, B = weights(L, n, perm, out, seed=n + L)
    X = np.random.default_rng(n).standard_normal((*lead, n), dtype=F32)
    if portable:
        monkeypatch.setenv("ONNXOPT_DISABLE_AVX2", "1")  # read when the kernel is created
    what = f"{describe(case)} portable={portable}"
    N = n if B is None else len(B)
    Y_ref = acdc_matmul(X, A, D, P, B)
    if n <= 1024:  # the dense expansion of a 4096 stack is 16M doubles per layer: slow for little gain
        W = dense_weight(A, D, P, N)
        Y_dense = X.astype(np.float64) @ W + (0.0 if B is None else B.astype(np.float64))
        assert rel_l2(Y_ref, Y_dense) <= 1e-6, f"{what}: numpy reference vs dense expansion"
    else:
        Y_dense = acdc_matmul(X.astype(np.float64), A, D, P, B)
    model = make_model(A, D, P, B, x_shape=[*(f"d{i}" for i in range(len(lead))), n])
    for threads in (1, 2):
        (Y,) = onnxopt.make_session(model, threads=threads).run(None, {"X": X})
        assert Y.shape == (*lead, N) and Y.dtype == F32, f"{what}: shape {Y.shape}"
        err = rel_l2(Y, Y_dense)
        assert err <= REL_L2_FFT, f"{what} threads={threads}: vs dense rel L2 {err:.3e}"


def test_reference_evaluator_and_spec():
    A, D, P, B = weights(2, 16, True, 12, 3)
    X = np.random.default_rng(3).standard_normal((4, 16), dtype=F32)
    model = make_model(A, D, P, B)
    (Y_ev,) = ReferenceEvaluator(onnx.load_from_string(model), new_ops=REFERENCE_OPS).run(None, {"X": X})
    (Y,) = onnxopt.make_session(model).run(None, {"X": X})
    assert rel_l2(Y, Y_ev) <= REL_L2_FFT
    spec = SPECS["ACDCMatMul"]
    assert spec.reference is acdc_matmul and "DCT" in spec.describe()


def test_run_time_errors_are_clear_and_the_session_survives():
    A, D, P, B = weights(2, 8, True, 6, 1)
    proto = onnx.load_from_string(make_model(A, D, P, B))
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    sess = onnxopt.make_session(proto.SerializeToString())
    rng = np.random.default_rng(1)
    with pytest.raises(Exception, match=r"X has last dimension 7 .* A expects n = 8"):
        sess.run(None, {"X": rng.standard_normal((2, 7), dtype=F32)})
    with pytest.raises(Exception, match="rank >= 1"):
        sess.run(None, {"X": np.array(1.0, F32)})
    X = rng.standard_normal((2, 8), dtype=F32)
    (Y,) = sess.run(None, {"X": X})
    assert rel_l2(Y, acdc_matmul(X, A, D, P, B)) <= REL_L2_FFT
    (Y0,) = sess.run(None, {"X": np.zeros((0, 8), F32)})
    assert Y0.shape == (0, 6)


CREATION_ERRORS = [
    pytest.param(dict(A=np.ones((2, 6), F32), D=np.ones((2, 6), F32)), r"power of two", id="n-6"),
    pytest.param(dict(A=np.ones(8, F32), D=np.ones(8, F32)), r"A must have shape \[L, n\]", id="A-rank-1"),
    pytest.param(dict(D=np.ones((1, 8), F32)), r"D must have shape \[2, 8\]", id="D-shape"),
    pytest.param(dict(P=np.zeros((2, 8), np.int64)), r"P row 0 is not a permutation", id="P-not-perm"),
    pytest.param(dict(P=np.zeros((2, 4), np.int64)), r"P must have shape \[2, 8\]", id="P-shape"),
    pytest.param(
        dict(P=np.zeros((2, 8), np.int32)),
        r"tensor\(int32\).* \(P\) of operator \(ACDCMatMul\)",
        id="P-int32",
    ),
    pytest.param(dict(B=np.ones(9, F32)), r"B must have shape \[N\] with 1 <= N <= n = 8", id="B-long"),
    pytest.param(dict(a_as_input=True), r"A \(input 1, 'A'\) must be a constant initializer", id="A-input"),
    pytest.param(dict(P=None), r"P \(input 3\) is absent while B is given", id="P-skipped"),
]


@pytest.mark.parametrize(("kwargs", "message"), CREATION_ERRORS)
def test_creation_errors_are_clear(kwargs, message):
    kwargs = dict(kwargs)
    A0, D0, P0, B0 = weights(2, 8, True, 6, 2)
    A, D, B = kwargs.pop("A", A0), kwargs.pop("D", D0), kwargs.pop("B", B0)
    P = kwargs.pop("P", P0)
    with pytest.raises(Exception, match=message) as info:
        onnxopt.make_session(make_model(A, D, P, B, x_shape=["M", A.shape[-1]], **kwargs))
    # The kernel names its node; onnxruntime's own type check (P-int32) names it its way: "node (acdc)".
    assert "ACDCMatMul" in str(info.value) and "acdc" in str(info.value), f"{kwargs}: {info.value}"
