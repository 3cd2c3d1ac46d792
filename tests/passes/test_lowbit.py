"""lowbit pass: the roundings on their own (grid, RTN, GPTQ against RTN on correlated inputs, monotone in
bits), then the pass on MLPs (Gemm with transB, MatMul, K not a multiple of the group) and CNNs (LowBitConv:
padding, stride, GPTQ from the input patches) checked against the original and against the numpy reference
of the emitted op, its declines, and the per-layer timing (lowbit.measure)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxopt
from models.synthetic import conv_net, mlp
from onnxopt.budget import OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.manager import optimize
from onnxopt.passes.lowbit import LowBit, quantize, relative_error, stored_bytes
from onnxopt.passes.lowbit_quantize import dequantize, gptq, grid, inverse_factor, rtn
from onnxopt.reference.lowbit import lowbit_conv, lowbit_matmul
from onnxopt.verify import compare_models


def _run(model, max_error=1e-2, settings=None, samples=64):
    """optimize with the lowbit pass alone; layers are not timed unless the settings say measure=1."""
    settings = {k: dict(v) for k, v in (settings or {}).items()}
    settings.setdefault("lowbit", {}).setdefault("measure", "0")
    feeds = synthetic_inputs(model, samples=samples, seed=1)
    budget = OutputBudget(model, feeds, max_error)
    return optimize(model, [LowBit()], feeds, budget, max_error=max_error, settings=settings), feeds


def _correlated(rows: int, K: int, seed: int) -> np.ndarray:
    """Inputs with a few strong directions, like a trained layer's activations."""
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((rows, 8)) @ rng.standard_normal((8, K)) + 0.1 * rng.standard_normal((rows, K))
    ).astype(np.float32)


def test_grid_represents_the_group_extremes_and_zero():
    Wg = np.array([[-1.0, 0.0], [0.5, 0.0], [2.0, 0.0]])
    S, Z = grid(Wg, 4)
    assert S[0] == pytest.approx(3.0 / 15) and Z[0] == 5
    assert S[1] == 1.0 and Z[1] == 0  # all-zero group
    q, S, Z = rtn(Wg.repeat(32, axis=0)[:32], 4, 32)
    W = dequantize(q, S, Z, 32)
    assert np.abs(W - Wg.repeat(32, axis=0)[:32]).max() <= S.max() / 2 + 1e-7


def test_rtn_error_falls_with_bits_and_smaller_groups():
    W = np.random.default_rng(0).standard_normal((256, 40))
    errs = [np.linalg.norm(W - dequantize(*rtn(W, b, 64), 64)) for b in (2, 3, 4)]
    assert errs == sorted(errs, reverse=True), errs
    errs = [np.linalg.norm(W - dequantize(*rtn(W, 3, g), g)) for g in (128, 64, 32)]
    assert errs == sorted(errs, reverse=True), errs


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_the_output(bits):
    K, N = 128, 48
    W = np.random.default_rng(bits).standard_normal((K, N)) / np.sqrt(K)
    X = _correlated(1024, K, bits).astype(np.float64)
    U, dead = inverse_factor(X[0::2], K)
    e_rtn = relative_error(W, dequantize(*rtn(W, bits, 32), 32), X[1::2], None)
    e_gptq = relative_error(W, dequantize(*gptq(W, U, dead, bits, 32), 32), X[1::2], None)
    assert e_gptq < 0.8 * e_rtn, (bits, e_gptq, e_rtn)


def test_gptq_codes_are_valid_and_inputs_never_seen_are_zeroed():
    K, N = 96, 10
    W = np.random.default_rng(1).standard_normal((K, N))
    X = np.random.default_rng(2).standard_normal((300, K))
    X[:, 5] = 0.0  # an input that is always zero
    U, dead = inverse_factor(X, K)
    assert dead[5] and dead.sum() == 1
    q, S, Z = gptq(W, U, dead, 3, 32)
    assert q.max() <= 7 and Z.max() <= 7 and q.shape == (K, N) and S.shape == (N, 3)
    assert np.all(dequantize(q, S, Z, 32)[5] == 0.0)


def test_quantize_packs_what_the_reference_computes():
    K, N = 70, 9  # K padded to 96 at G = 32
    W = np.random.default_rng(3).standard_normal((K, N)).astype(np.float32)
    X = _correlated(200, K, 3)
    b = np.random.default_rng(4).standard_normal(N).astype(np.float32)
    for rounding in ("rtn", "gptq"):
        kind, Q, S, Z, err = quantize(W, X, b, 4, 32, rounding)
        assert kind == rounding and Q.shape == (N, 96 * 4 // 8)
        held = X[1::2]
        Y = lowbit_matmul(held, Q, S, Z, b, K=K, N=N, bits=4, group_size=32)
        ref = held.astype(np.float64) @ W + b
        assert np.linalg.norm(Y - ref) / np.linalg.norm(ref) == pytest.approx(err, rel=1e-3)


def test_stored_bytes():
    assert stored_bytes(4096, 4096, 4, 32, False) == 4096 * 2048 + 5 * 4096 * 128
    assert stored_bytes(100, 10, 3, 64, True) == 10 * 128 * 3 // 8 + 5 * 10 * 2 + 40


@pytest.mark.parametrize(("use_gemm", "trans_b"), [(True, False), (True, True), (False, False)])
def test_pass_rewrites_and_matches_the_original(use_gemm, trans_b):
    model = mlp([100, 64, 10], seed=2, use_gemm=use_gemm, trans_b=trans_b)
    # random Gaussian weights: 4 bits at G = 32 cost ~7% of a layer's output (a step of ~0.27 sigma)
    result, feeds = _run(model, max_error=0.2, settings={"lowbit": {"bits": "4", "group_size": "32"}})
    fc0 = next(r for r in result.records if r.node == "fc0")
    assert fc0.status == "applied", [r.as_dict() for r in result.records]
    assert fc0.detail["bits"] == 4 and fc0.detail["group_size"] == 32
    assert fc0.bytes_after < fc0.bytes_before / 4
    onnx.checker.check_model(result.model)
    assert "LowBitMatMul" in [n.op_type for n in result.model.graph.node]
    errs = compare_models(model, result.model, feeds)
    assert max(e.rel_l2 for e in errs) <= 0.2, errs


def test_more_bits_less_error_through_the_pass():
    model = mlp([128, 64, 10], seed=3)
    errors = []
    for bits in (2, 3, 4):
        result, feeds = _run(
            model, max_error=10.0, settings={"lowbit": {"bits": str(bits), "rounding": "rtn"}}
        )
        fc0 = next(r for r in result.records if r.node == "fc0")
        assert fc0.status == "applied" and fc0.detail["rounding"] == "rtn", fc0.as_dict()
        errors.append(max(e.rel_l2 for e in compare_models(model, result.model, feeds)))
    assert errors == sorted(errors, reverse=True), errors


def test_declines_with_reasons():
    model = mlp([16, 64, 10], seed=4)  # fc0 has K = 16 < 32
    result, _ = _run(model, max_error=10.0)
    fc0 = next(r for r in result.records if r.node == "fc0")
    assert fc0.status == "declined" and "K < 32" in fc0.reason, fc0.as_dict()
    result, _ = _run(mlp([64, 64, 10], seed=4), max_error=1e-9)
    fc0 = next(r for r in result.records if r.node == "fc0")
    assert fc0.status == "declined" and "no bit width" in fc0.reason, fc0.as_dict()
    result, _ = _run(mlp([64, 64, 10], seed=4), settings={"lowbit": {"bits": "5"}})
    fc0 = next(r for r in result.records if r.node == "fc0")
    assert fc0.status == "declined" and "unsupported bits" in fc0.reason, fc0.as_dict()


def test_emitted_weights_are_the_packed_codes():
    model = mlp([64, 32, 10], seed=6)
    result, _ = _run(model, max_error=10.0, settings={"lowbit": {"bits": "2", "group_size": "64"}})
    node = next(n for n in result.model.graph.node if n.op_type == "LowBitMatMul")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["bits"] == 2 and attrs["group_size"] == 64 and attrs["K"] == 64
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert inits[node.input[1]].dtype == np.uint8 and inits[node.input[1]].shape == (attrs["N"], 64 * 2 // 8)


def _record(result, name):
    return next(r for r in result.records if r.node == name)


@pytest.mark.parametrize(("strides", "pads"), [(1, 1), (2, 0)])
def test_conv_rewrites_and_matches_the_original(strides, pads):
    model = conv_net([8, 16, 12], size=9, seed=5, strides=strides, pads=pads)
    result, feeds = _run(
        model, max_error=0.3, settings={"lowbit": {"bits": "4", "group_size": "32"}}, samples=16
    )
    recs = [_record(result, n) for n in ("conv0", "conv1")]
    assert all(r.status == "applied" for r in recs), [r.as_dict() for r in recs]
    assert recs[1].detail["shape"] == [16 * 9, 12] and recs[1].bytes_after < recs[1].bytes_before / 4
    onnx.checker.check_model(result.model)
    nodes = [n for n in result.model.graph.node if n.op_type == "LowBitConv"]
    assert len(nodes) == 2 and "Conv" not in [n.op_type for n in result.model.graph.node]
    errs = compare_models(model, result.model, feeds)
    assert max(e.rel_l2 for e in errs) <= 0.3, errs
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["strides"] == [strides] * 2 and attrs["pads"] == [pads] * 4 and attrs["C"] == 8


def test_conv_reference_matches_the_kernel_on_the_rewritten_layer():
    model = conv_net([8, 10], size=7, seed=8)  # one Conv: its output is the graph output
    result, feeds = _run(model, max_error=0.3, settings={"lowbit": {"bits": "3", "group_size": "32"}})
    node = next(n for n in result.model.graph.node if n.op_type == "LowBitConv")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    x = feeds["x"][:3]
    (y,) = onnxopt.make_session(result.model.SerializeToString()).run(None, {"x": x})
    ref = lowbit_conv(x, *(inits[n] for n in node.input[1:]), **attrs)
    assert np.linalg.norm(y - ref) <= 1e-5 * np.linalg.norm(ref)


def test_conv_gptq_uses_the_patches_and_beats_rtn_after_relu():
    model = conv_net([8, 16, 16], size=10, seed=6)
    errs = {}
    for rounding in ("rtn", "gptq"):
        settings = {"lowbit": {"bits": "3", "group_size": "32", "rounding": rounding}}
        result, _ = _run(model, max_error=10.0, settings=settings, samples=32)
        rec = _record(result, "conv1")  # its inputs are ReLU outputs: overlapping, correlated patches
        assert rec.status == "applied" and rec.detail["rounding"] == rounding, rec.as_dict()
        errs[rounding] = rec.est_error
    assert errs["gptq"] < errs["rtn"], errs


def test_conv_more_bits_less_error():
    model = conv_net([8, 16, 8], size=8, seed=7)
    errors = []
    for bits in (2, 3, 4):
        result, feeds = _run(
            model, max_error=10.0, settings={"lowbit": {"bits": str(bits), "rounding": "rtn"}}
        )
        assert _record(result, "conv1").status == "applied"
        errors.append(max(e.rel_l2 for e in compare_models(model, result.model, feeds)))
    assert errors == sorted(errors, reverse=True), errors


def test_conv_declines_with_reasons():
    result, _ = _run(conv_net([2, 8, 8], size=8, seed=1), max_error=10.0)  # conv0: C kh kw = 18
    rec = _record(result, "conv0")
    assert rec.status == "declined" and "C kh kw = 18 < 32" in rec.reason, rec.as_dict()
    result, _ = _run(conv_net([8, 8, 8], size=8, seed=1, group=2), max_error=10.0)
    rec = _record(result, "conv0")
    assert rec.status == "declined" and "group=2" in rec.reason, rec.as_dict()
    result, _ = _run(
        conv_net([8, 8, 8], size=8, seed=1), max_error=10.0, settings={"lowbit": {"layers": "fc"}}
    )
    rec = _record(result, "conv1")
    assert rec.status == "declined" and "lowbit.layers=fc" in rec.reason, rec.as_dict()


def test_measured_layers_carry_their_times_or_decline_with_them():
    """lowbit.measure=1 (the default): a kept rewrite carries the measured times, a declined one says it was
    not faster; either way the layer was timed. (Which one happens depends on this machine's load.)"""
    model = conv_net([16, 32, 8], size=8, seed=2)
    settings = {"lowbit": {"bits": "4", "group_size": "32", "measure": "1"}}
    result, _ = _run(model, max_error=10.0, settings=settings, samples=8)
    rec = _record(result, "conv1")
    said = str(rec.as_dict())
    if rec.status == "applied":
        assert rec.detail["ms_before"] > 0 and rec.detail["speedup"] >= 1.05, said
    else:  # declined as slower per layer, or undone as slower in the whole model
        assert "not faster" in said or "undone" in said, said


def test_int8_activation_mode_through_the_pass():
    model = mlp([128, 64, 10], seed=9)
    weight_only = {"bits": "4", "rounding": "rtn", "act_bits": "0"}
    base, feeds = _run(model, max_error=10.0, settings={"lowbit": weight_only})
    assert "act_bits" not in _record(base, "fc0").detail
    result, _ = _run(model, max_error=10.0, settings={"lowbit": {"act_bits": "8", "rounding": "rtn"}})
    fc0 = _record(result, "fc0")
    assert fc0.status == "applied" and fc0.detail["bits"] == 4 and fc0.detail["act_bits"] == 8, fc0.as_dict()
    node = next(n for n in result.model.graph.node if n.op_type == "LowBitMatMul")
    assert {a.name: a.i for a in node.attribute}["act_bits"] == 8
    # the estimate includes the activation rounding: above the weight-only estimate, and near what it costs
    assert fc0.est_error > _record(base, "fc0").est_error
    err = max(e.rel_l2 for e in compare_models(model, result.model, feeds))
    assert err < 0.2, err
    result, _ = _run(model, max_error=10.0, settings={"lowbit": {"act_bits": "8", "bits": "2"}})
    assert "needs 4-bit codes" in _record(result, "fc0").reason
    result, _ = _run(model, max_error=10.0, settings={"lowbit": {"act_bits": "4"}})
    assert "act_bits must be one of" in _record(result, "fc0").reason


def test_auto_activation_width_prefers_int8_where_it_fits():
    """act_bits=auto (the default): each 4-bit option comes twice, int8 inputs first (the manager takes the
    first option that fits); a tolerance between the two forms' errors leaves only the float form."""
    import onnx_graphsurgeon as gs

    from onnxopt.manager import _capture
    from onnxopt.rewrite import LOCAL_SLACK, PassContext
    from onnxopt.verify import complete_shapes

    model = mlp([128, 64, 10], seed=9)
    feeds = synthetic_inputs(model, samples=64, seed=1)
    graph = gs.import_onnx(model)
    node = next(n for n in graph.nodes if n.name == "fc0")
    acts = _capture(model, feeds, {node.inputs[0].name})
    settings = {"bits": "4", "group_size": "32", "rounding": "rtn", "measure": "0"}

    def options(tolerance):
        ctx = PassContext(graph, complete_shapes(model, feeds), tolerance / LOCAL_SLACK, settings, acts)
        return LowBit().options(node, ctx)

    both = options(10.0)
    assert [o.detail.get("act_bits", 0) for o in both] == [8, 0], [o.detail for o in both]
    e8, e0 = both[0].est_error, both[1].est_error
    assert e0 < e8 and both[0].bytes_after == both[1].bytes_after, (e0, e8)
    only_float = options((e0 + e8) / 2)
    assert [o.detail.get("act_bits", 0) for o in only_float] == [0]
    loose, _ = _run(model, max_error=10.0, settings={"lowbit": settings})
    assert _record(loose, "fc0").detail.get("act_bits") == 8, _record(loose, "fc0").as_dict()
