"""CirculantMatMul kernel: the C++ op in onnxruntime against the numpy FFT reference and against the dense
matrix W = D P expanded, over block sizes (4, 16, 64, full), odd block counts, leading batch shapes, both
builds and 1 and 2 threads; plus run-time and creation-time errors and the onnx reference evaluator."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxopt
from onnxopt.reference import REFERENCE_OPS, SPECS
from onnxopt.reference.circulant import circulant_matmul, dense_weight
from tolerances import REL_L2_FFT, rel_l2

F32 = np.float32


def make_model(C, S, B=None, block=None, x_shape=None, c_as_input=False) -> bytes:
    """One-node graph Y = CirculantMatMul(X, C, S[, B]); X [..., K] with a symbolic leading shape."""
    block = C.shape[-1] if block is None else block
    x_shape = ["M", C.shape[0] * C.shape[-1]] if x_shape is None else x_shape
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    inits = [numpy_helper.from_array(S, "S")]
    if c_as_input:
        inputs.append(helper.make_tensor_value_info("C", TensorProto.FLOAT, list(C.shape)))
    else:
        inits.append(numpy_helper.from_array(C, "C"))
    names = ["X", "C", "S"]
    if B is not None:
        inits.append(numpy_helper.from_array(B, "B"))
        names.append("B")
    node = helper.make_node("CirculantMatMul", names, ["Y"], domain="onnxopt", name="circ", block=block)
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnxopt", 1)], ir_version=10
    )
    return model.SerializeToString()


def weights(kb: int, nb: int, b: int, bias: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((kb, nb, b), dtype=F32) / np.sqrt(kb * b, dtype=F32)
    S = rng.choice(np.array([-1.0, 1.0], F32), kb * b)
    B = rng.standard_normal(nb * b, dtype=F32) if bias else None
    return C, S, B


# (kb, nb, b, leading shape, bias): odd block counts; full circulant = one block.
CASES = [
    (3, 5, 4, (1,), True),
    (5, 3, 4, (2, 5), False),
    (7, 9, 16, (3,), True),
    (9, 2, 16, (1,), False),
    (3, 11, 64, (2, 5), True),
    (2, 3, 64, (3,), True),
    (1, 1, 256, (3,), True),  # full circulant
    (1, 1, 2048, (2, 5), False),  # full circulant, long FFT
    (13, 1, 4, (20,), True),  # many input blocks, one output block, rows spread over lanes
]


def describe(case) -> str:
    kb, nb, b, lead, bias = case
    return f"K={kb * b} N={nb * b} b={b} lead={list(lead)} bias={bias}"


@pytest.mark.parametrize("portable", [False, True], ids=["avx2", "portable"])
@pytest.mark.parametrize("case", CASES, ids=[describe(c).replace(" ", ",") for c in CASES])
def test_kernel_matches_reference_and_dense(case, portable, monkeypatch):
    kb, nb, b, lead, bias = case
    C, S, B = weights(kb, nb, b, bias, seed=kb * 100 + nb)
    X = np.random.default_rng(b).standard_normal((*lead, kb * b), dtype=F32)
    if portable:
        monkeypatch.setenv("ONNXOPT_DISABLE_AVX2", "1")  # read when the kernel is created
    what = f"{describe(case)} portable={portable}"
    Y_dense = X.astype(np.float64) @ dense_weight(C, S) + (0.0 if B is None else B.astype(np.float64))
    Y_ref = circulant_matmul(X, C, S, B)
    assert rel_l2(Y_ref, Y_dense) <= 1e-6, f"{what}: numpy FFT reference vs dense D P"
    model = make_model(C, S, B, x_shape=[*(f"d{i}" for i in range(len(lead))), kb * b])
    for threads in (1, 2):
        (Y,) = onnxopt.make_session(model, threads=threads).run(None, {"X": X})
        assert Y.shape == (*lead, nb * b) and Y.dtype == F32, f"{what}: shape {Y.shape}"
        err = rel_l2(Y, Y_dense)
        assert err <= REL_L2_FFT, f"{what} threads={threads}: vs dense rel L2 {err:.3e}"


def test_reference_evaluator_and_spec():
    C, S, B = weights(3, 2, 8, True, 3)
    X = np.random.default_rng(3).standard_normal((4, 24), dtype=F32)
    model = make_model(C, S, B)
    (Y_ev,) = ReferenceEvaluator(onnx.load_from_string(model), new_ops=REFERENCE_OPS).run(None, {"X": X})
    (Y,) = onnxopt.make_session(model).run(None, {"X": X})
    assert rel_l2(Y, Y_ev) <= REL_L2_FFT
    spec = SPECS["CirculantMatMul"]
    assert spec.reference is circulant_matmul and "block" in spec.describe()


def test_run_time_errors_are_clear_and_the_session_survives():
    C, S, B = weights(2, 3, 4, True, 1)
    proto = onnx.load_from_string(make_model(C, S, B))
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    sess = onnxopt.make_session(proto.SerializeToString())
    rng = np.random.default_rng(1)
    with pytest.raises(Exception, match=r"X has last dimension 7 .* C expects K = 8"):
        sess.run(None, {"X": rng.standard_normal((2, 7), dtype=F32)})
    with pytest.raises(Exception, match="rank >= 1"):
        sess.run(None, {"X": np.array(1.0, F32)})
    X = rng.standard_normal((2, 8), dtype=F32)
    (Y,) = sess.run(None, {"X": X})
    assert rel_l2(Y, circulant_matmul(X, C, S, B)) <= REL_L2_FFT
    (Y0,) = sess.run(None, {"X": np.zeros((0, 8), F32)})
    assert Y0.shape == (0, 12)


CREATION_ERRORS = [
    pytest.param(dict(block=3), r"'block' must be a power of two", id="block-3"),
    pytest.param(dict(block=8), r"C must have shape \[K/b, N/b, b\] with b = block = 8", id="block-mismatch"),
    pytest.param(dict(c_as_input=True), r"C \(input 1, 'C'\) must be a constant initializer", id="C-input"),
    pytest.param(dict(S=np.ones(5, F32)), r"S must have shape \[K\] = \[8\]", id="S-length"),
    pytest.param(dict(B=np.ones(5, F32)), r"B must have shape \[N\] = \[12\]", id="B-length"),
    pytest.param(dict(C=np.ones((2, 3), F32), block=4), r"C must have shape", id="C-rank-2"),
]


@pytest.mark.parametrize(("kwargs", "message"), CREATION_ERRORS)
def test_creation_errors_are_clear(kwargs, message):
    kwargs = dict(kwargs)
    C0, S0, B0 = weights(2, 3, 4, True, 2)
    C, S, B = kwargs.pop("C", C0), kwargs.pop("S", S0), kwargs.pop("B", B0)
    x_shape = ["M", 8]
    with pytest.raises(Exception, match=message) as info:
        onnxopt.make_session(make_model(C, S, B, x_shape=x_shape, **kwargs))
    assert "CirculantMatMul node 'circ'" in str(info.value), f"{kwargs}: {info.value}"
