"""binary pass with k-bit activations (binary.act_bits): the calibrated range on its own, then the pass on an
MLP (signed first input: an offset T; post-ReLU input: none) and a CNN, checked with onnx.checker and against
the numpy reference of the emitted ops; more activation bits cost less error; the budget picks among them; bad
settings are declined."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

import onnxopt
from models.synthetic import conv_net, mlp
from onnxopt.passes.binary import act_range
from onnxopt.reference import REFERENCE_OPS
from onnxopt.reference.binary import act_codes
from onnxopt.verify import compare_models
from tests.passes.test_binary import _record, _run


def _node(model: onnx.ModelProto, source: str) -> onnx.NodeProto:
    """The emitted node of `source` (its name starts with the source node's)."""
    return next(n for n in model.graph.node if n.name.startswith(source) and n.domain == "onnxopt")


def _attr(node: onnx.NodeProto, name: str):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def test_act_range_fits_the_codes():
    rng = np.random.default_rng(0)
    relu = np.maximum(rng.standard_normal(20000), 0).astype(np.float32)
    lo, s = act_range(relu, 2, signed=False)
    assert lo == 0.0 and 0 < s < relu.max() / 3  # a clip below the max: the tail costs less than the step
    signed = rng.standard_normal(20000).astype(np.float32)
    lo, s = act_range(signed, 3, signed=True)
    assert -4 < lo < -1 and 0 < s
    errors = []
    for bits in (2, 3, 4):
        lo, s = act_range(signed, bits, signed=True)
        xq = lo + s * act_codes(signed, np.float32(lo), bits, s)
        errors.append(float(np.mean((xq - signed) ** 2)))
        # the chosen clips beat the plain min / max
        lo0, hi0 = float(signed.min()), float(signed.max())
        s0 = (hi0 - lo0) / (2**bits - 1)
        plain = lo0 + s0 * act_codes(signed, np.float32(lo0), bits, s0)
        assert errors[-1] <= float(np.mean((plain - signed) ** 2))
    assert errors[0] > errors[1] > errors[2], errors
    assert act_range(np.zeros(10, np.float32), 2, signed=False) == (0.0, 1.0)


@pytest.mark.parametrize("act_bits", [2, 3, 4])
@pytest.mark.parametrize("weights", ["sign", "01"])
def test_pass_emits_kbit_matmul(act_bits, weights):
    model = mlp([100, 64, 10], seed=2)
    settings = {"binary": {"mode": "full", "weights": weights, "act_bits": str(act_bits)}}
    result, feeds = _run(model, settings=settings)
    for name, signed in (("fc0", True), ("fc1", False)):  # fc0 reads the signed input, fc1 a ReLU's output
        rec = _record(result, name)
        assert rec.status == "applied", rec.as_dict()
        assert rec.detail["act_bits"] == act_bits and rec.detail["centred"] == signed, rec.detail
        node = _node(result.model, name)
        assert _attr(node, "act_bits") == act_bits and _attr(node, "act_scale") > 0
        assert (len(node.input) == 5) == signed  # T only where the input goes below 0
        assert rec.flops_after <= act_bits * rec.flops_before / 64 + 1  # k AND-popcounts per 64 MACs
    onnx.checker.check_model(result.model)
    (x,) = feeds.values()
    (Y,) = onnxopt.make_session(result.model.SerializeToString()).run(None, {"x": x})
    (Y_ref,) = ReferenceEvaluator(result.model, new_ops=REFERENCE_OPS).run(None, {"x": x})
    np.testing.assert_allclose(Y, Y_ref, rtol=1e-4, atol=1e-4 * np.abs(Y_ref).max())


def test_pass_emits_kbit_conv():
    model = conv_net([5, 16, 8], size=9, seed=3)
    result, feeds = _run(model, settings={"binary": {"act_bits": "3"}})
    for name in ("conv0", "conv1"):
        rec = _record(result, name)
        assert rec.status == "applied" and rec.detail["op"] == "BinaryConv", rec.as_dict()
        assert rec.detail["act_bits"] == 3 and _attr(_node(result.model, name), "act_bits") == 3
    onnx.checker.check_model(result.model)
    (x,) = feeds.values()
    (Y,) = onnxopt.make_session(result.model.SerializeToString()).run(None, {"x": x})
    (Y_ref,) = ReferenceEvaluator(result.model, new_ops=REFERENCE_OPS).run(None, {"x": x})
    np.testing.assert_allclose(Y, Y_ref, rtol=1e-4, atol=1e-4 * np.abs(Y_ref).max())


def test_more_activation_bits_lose_less():
    model = mlp([128, 64, 10], seed=4)
    layer, whole = {}, {}
    for bits in (2, 3, 4):
        settings = {"binary": {"mode": "full", "weights": "sign", "act_bits": str(bits)}}
        result, feeds = _run(model, settings=settings)
        layer[bits] = _record(result, "fc0").est_error
        whole[bits] = max(e.rel_l2 for e in compare_models(model, result.model, feeds))
    assert layer[2] > layer[3] > layer[4] > 0, layer
    assert whole[2] > whole[3] > whole[4] > 0, whole
    # and k-bit activations lose less than float activations do not: partial is still the floor
    result, feeds = _run(model, settings={"binary": {"mode": "partial", "weights": "sign"}})
    assert max(e.rel_l2 for e in compare_models(model, result.model, feeds)) < whole[4]


def test_budget_steps_to_more_bits():
    """Options run A1, A2, A3, A4 (then partial): under a budget between their errors, the chosen option of
    the single layer has more activation bits than the most compressive one."""
    model = mlp([128, 10], seed=5)
    errors = {}
    for bits in (1, 2, 4):
        settings = {"binary": {"mode": "full", "weights": "sign", "act_bits": str(bits)}}
        result, _ = _run(model, settings=settings)
        errors[bits] = _record(result, "fc0").est_error
    assert errors[1] > errors[2] > errors[4], errors
    budget = (errors[2] + errors[4]) / 2
    result, _ = _run(model, max_error=budget, settings={"binary": {"mode": "full", "weights": "sign"}})
    rec = _record(result, "fc0")
    assert rec.status == "applied" and rec.detail["act_bits"] in (3, 4), rec.as_dict()


def test_declines_bad_act_bits_and_lists_kbit_errors():
    result, _ = _run(mlp([64, 32, 10], seed=8), settings={"binary": {"act_bits": "2,9"}})
    assert "binary.act_bits" in _record(result, "fc0").reason
    result, _ = _run(mlp([64, 32, 10], seed=8), settings={"binary": {"act_bits": "two"}})
    assert "binary.act_bits" in _record(result, "fc0").reason
    result, _ = _run(mlp([64, 32, 10], seed=6), max_error=1e-3)
    reason = _record(result, "fc0").reason
    assert "a2/sign" in reason and "a4/01" in reason and "partial/sign" in reason, reason


def test_center_off_clips_at_zero():
    result, _ = _run(mlp([64, 32, 10], seed=9), settings={"binary": {"act_bits": "2", "center": "0"}})
    rec = _record(result, "fc0")
    assert rec.detail["act_bits"] == 2 and not rec.detail["centred"]
    assert len(_node(result.model, "fc0").input) == 4  # X, Wbits, S, B: no T
