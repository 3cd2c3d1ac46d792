"""binary pass: the weight fits on their own (XNOR-Net's scale, the {0,1} least-squares fit), then the pass on
MLPs (Gemm with transB, MatMul) and a CNN in every mode, checked with onnx.checker, against the numpy
reference of the emitted ops and against the original (binarization costs more error than the float-activation
mode, which costs more than nothing), the budget rejecting it, and its declines."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxopt
from models.synthetic import conv_net, mlp
from onnxopt.budget import OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.manager import optimize
from onnxopt.passes.binary import Binary, dequantize, fit
from onnxopt.reference import REFERENCE_OPS
from onnxopt.verify import compare_models

LOOSE = 10.0  # a budget every option fits, so that every candidate is rewritten


def _run(model, max_error=LOOSE, settings=None, samples=32):
    feeds = synthetic_inputs(model, samples=samples, seed=1)
    budget = OutputBudget(model, feeds, max_error)
    return optimize(model, [Binary()], feeds, budget, max_error=max_error, settings=settings), feeds


def _record(result, node: str):
    return next(r for r in result.records if r.node == node)


def test_sign_fit_is_xnor_net():
    W = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    b, S = fit(W, "sign")
    np.testing.assert_array_equal(b, (W.T >= 0).astype(np.uint8))
    np.testing.assert_allclose(S[:, 0], np.abs(W).mean(axis=0), rtol=1e-6)
    # alpha = mean |W| is the least-squares scale of sign(W)
    Wq = dequantize(b, S, "sign")
    for scale in (0.9, 1.1):
        assert np.linalg.norm(W - Wq) < np.linalg.norm(W - scale * Wq)


def test_01_fit_recovers_a_two_level_weight_and_beats_sign_on_offset_weights():
    rng = np.random.default_rng(1)
    B = rng.integers(0, 2, (40, 6))
    W = (B * np.array([0.5, 1, 2, 3, 4, 5]) + np.array([-1, 0.2, 0.3, -2, 1, 0])).astype(np.float32)
    b, S = fit(W, "01")
    np.testing.assert_allclose(dequantize(b, S, "01"), W, atol=1e-6)
    W2 = (rng.standard_normal((64, 5)) + 3.0).astype(np.float32)  # all positive: sign weights are one level
    err = {w: np.linalg.norm(W2 - dequantize(*fit(W2, w), w)) for w in ("sign", "01")}
    assert err["01"] < 0.8 * err["sign"], err


@pytest.mark.parametrize(("use_gemm", "trans_b"), [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize(
    ("mode", "weights"), [("full", "sign"), ("full", "01"), ("partial", "sign"), ("partial", "01")]
)
def test_pass_rewrites_mlp_and_runs_the_reference(use_gemm, trans_b, mode, weights):
    model = mlp([100, 64, 10], seed=2, use_gemm=use_gemm, trans_b=trans_b)
    result, feeds = _run(model, settings={"binary": {"mode": mode, "weights": weights}})
    for name in ("fc0", "fc1"):
        rec = _record(result, name)
        assert rec.status == "applied", rec.as_dict()
        assert rec.detail == {
            "op": "BinaryMatMul",
            "mode": mode,
            "weights": weights,
            "centred": mode == "full",
            "act_bits": 1 if mode == "full" else 0,
        }
        assert rec.bytes_after < rec.bytes_before / 5  # bits, scales, bias and T of a 64 x 10 layer
    onnx.checker.check_model(result.model)
    assert [n.op_type for n in result.model.graph.node].count("BinaryMatMul") == 2
    (x,) = feeds.values()
    (Y,) = onnxopt.make_session(result.model.SerializeToString()).run(None, {"x": x})
    (Y_ref,) = ReferenceEvaluator(result.model, new_ops=REFERENCE_OPS).run(None, {"x": x})
    np.testing.assert_allclose(Y, Y_ref, rtol=1e-4, atol=1e-4 * np.abs(Y_ref).max())


def test_pass_rewrites_cnn_and_runs_the_reference():
    model = conv_net([5, 16, 8], size=9, seed=3)
    result, feeds = _run(model, settings={"binary": {"weights": "01"}})
    for name in ("conv0", "conv1"):
        rec = _record(result, name)
        assert rec.status == "applied" and rec.detail["op"] == "BinaryConv", rec.as_dict()
    onnx.checker.check_model(result.model)
    (x,) = feeds.values()
    (Y,) = onnxopt.make_session(result.model.SerializeToString()).run(None, {"x": x})
    (Y_ref,) = ReferenceEvaluator(result.model, new_ops=REFERENCE_OPS).run(None, {"x": x})
    np.testing.assert_allclose(Y, Y_ref, rtol=1e-4, atol=1e-4 * np.abs(Y_ref).max())


def test_float_activations_lose_less_than_binary_ones():
    model = mlp([128, 64, 10], seed=4)
    errors = {}
    for mode in ("full", "partial"):
        result, feeds = _run(model, settings={"binary": {"mode": mode, "weights": "sign"}})
        errors[mode] = max(e.rel_l2 for e in compare_models(model, result.model, feeds))
        assert _record(result, "fc0").est_error > 0.05  # binarizing a float-trained layer is never free
    assert 0 < errors["partial"] < errors["full"], errors


def test_auto_offers_full_before_partial():
    model = mlp([64, 32, 10], seed=5)
    result, _ = _run(model)
    assert (
        _record(result, "fc0").detail["mode"] == "full"
    )  # the more compressive option fits the loose budget


def test_budget_rejects_binarization():
    result, _ = _run(mlp([64, 32, 10], seed=6), max_error=1e-2)
    rec = _record(result, "fc0")
    assert rec.status == "declined" and "binarization breaks the tolerance" in rec.reason, rec.as_dict()
    assert "full/sign" in rec.reason and "partial/01" in rec.reason


def test_declines_with_reasons():
    result, _ = _run(conv_net([4, 8, 4], size=6, seed=7), settings={"binary": {"mode": "partial"}})
    assert "saves no arithmetic" in _record(result, "conv0").reason
    result, _ = _run(conv_net([4, 8, 4], size=6, seed=7, group=4))
    assert "group=4" in _record(result, "conv0").reason
    result, _ = _run(mlp([64, 32, 10], seed=8), settings={"binary": {"weights": "ternary"}})
    assert "binary.weights" in _record(result, "fc0").reason
    # a MatMul whose weight is computed in the graph
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["w0"], ["w"], name="r"),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.ones((8, 4), np.float32), "w0")],
    )
    result, _ = _run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert "not a constant" in _record(result, "mm").reason
    # a float64 weight
    W = numpy_helper.from_array(np.ones((8, 4)), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["n", 4])],
        [W],
    )
    result, _ = _run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert "float32" in _record(result, "mm").reason


def test_layers_setting_selects_nodes():
    result, _ = _run(mlp([32, 32, 10], seed=10), settings={"binary": {"layers": "fc1"}})
    assert _record(result, "fc1").status == "applied"
    assert "not selected" in _record(result, "fc0").reason
    result, _ = _run(conv_net([4, 8, 4], size=6, seed=7), settings={"binary": {"layers": "fc"}})
    assert "not selected" in _record(result, "conv0").reason


def test_shared_weight_is_declined():
    model = mlp([32, 32, 32], seed=9)
    g = model.graph
    g.node[-1].input[1] = g.node[0].input[1]  # both layers use fc0's weight
    result, _ = _run(model)
    assert "shared" in _record(result, "fc0").reason
