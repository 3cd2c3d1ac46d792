"""int8 pass: static and dynamic quantization of small Conv/Gemm/MatMul graphs, per-layer control with one
deliberately sensitive layer, a budget nothing meets, varying-shape calibration, composition after lowrank
and beside an onnxopt custom op, and bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.synthetic import conv_net, mlp
from onnxopt.budget import OutputBudget
from onnxopt.data import load_samples, synthetic_inputs
from onnxopt.errors import BudgetError, UserError
from onnxopt.manager import optimize
from onnxopt.model_pass import ModelContext
from onnxopt.passes import make_passes
from onnxopt.passes.circulant import signs
from onnxopt.passes.int8 import Int8
from onnxopt.passes.int8_quantize import Quantizer, QuantSettings, split_samples
from onnxopt.reference.circulant import dense_weight
from onnxopt.verify import compare_models, run_model


def _run(model, max_error=5e-2, methods=("int8",), settings=None, samples=16, calibrated=True, **kw):
    feeds = synthetic_inputs(model, samples=samples, seed=1)
    budget = OutputBudget(model, feeds, max_error)
    result = optimize(
        model,
        make_passes(list(methods)),
        feeds,
        budget,
        max_error=max_error,
        settings=settings,
        calibrated=calibrated,
        **kw,
    )
    return result, feeds


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def _int8(result) -> dict[str, object]:
    return {r.node: r for r in result.records if r.method == "int8"}


def _clean(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_static_conv_net_is_qdq_within_budget():
    model = conv_net([3, 8, 8, 4], size=10)
    result, feeds = _run(model)
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(result.model)
    recs = _int8(result)
    assert sorted(recs) == ["conv0", "conv1", "conv2"]
    assert all(r.status == "applied" and r.detail["mode"] == "static" for r in recs.values())
    chosen = {r.detail["calibrate"] for r in recs.values()}  # auto: the calibrator of lower output error
    assert len(chosen) == 1 and any(f"calibration {chosen.pop()} chosen" in m for m in result.messages)
    assert all(r.bytes_after < r.bytes_before / 2 for r in recs.values())  # int8 weights, fp32 scales
    _clean(result.model)
    assert max(e.rel_l2 for e in compare_models(model, result.model, feeds)) <= 5e-2
    tagged = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear" and n.metadata_props]
    assert tagged and all(n.metadata_props[0].value == "int8" for n in tagged)


@pytest.mark.parametrize("use_gemm", [True, False])
def test_dynamic_mlp_uses_integer_matmul(use_gemm):
    model = mlp([16, 32, 8], use_gemm=use_gemm)
    result, feeds = _run(model, settings={"int8": {"mode": "dynamic"}})
    assert "MatMulInteger" in _ops(result.model) or "DynamicQuantizeMatMul" in _ops(result.model)
    assert all(r.status == "applied" and r.detail["mode"] == "dynamic" for r in _int8(result).values())
    _clean(result.model)
    assert max(e.rel_l2 for e in compare_models(model, result.model, feeds)) <= 5e-2


def test_mode_defaults_to_dynamic_without_calibration_data():
    result, _ = _run(mlp([16, 32, 8]), calibrated=False)
    assert {r.detail["mode"] for r in _int8(result).values()} == {"dynamic"}


def _sensitive_mlp() -> onnx.ModelProto:
    """fc0 -> relu -> fc1 -> relu -> fc2, where hidden unit 0 after fc0 is always 0 (zero weights, negative
    bias) and fc1's weights from it are 1e4: no effect in fp32, but every per-channel int8 scale of fc1 is
    set by them, so fc1's real weights round to zero."""
    model = mlp([16, 32, 32, 8], seed=3)
    inits = {t.name: t for t in model.graph.initializer}
    w0, b0, w1 = (numpy_helper.to_array(inits[n]).copy() for n in ("W0", "b0", "W1"))
    w0[:, 0], b0[0], w1[0, :] = 0.0, -1.0, 1e4
    for name, arr in (("W0", w0), ("b0", b0), ("W1", w1)):
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    return model


def test_the_sensitive_layer_is_the_one_kept_fp32():
    result, _ = _run(_sensitive_mlp(), max_error=3e-2)
    recs = _int8(result)
    assert recs["fc1"].status == "undone", recs["fc1"]
    assert "sensitivity" in recs["fc1"].reason and "kept fp32" in recs["fc1"].reason
    assert recs["fc0"].status == recs["fc2"].status == "applied"
    sens = {n: r.detail["sensitivity"] for n, r in recs.items()}
    assert sens["fc1"] == max(sens.values()) and sens["fc1"] > 10 * sens["fc0"], sens
    assert result.verification["worst_rel_l2"] <= 3e-2


def test_more_layers_in_fp32_less_error():
    model = _sensitive_mlp()
    feeds = synthetic_inputs(model, samples=16, seed=1)
    ref = run_model(model, feeds)["y"]
    with Quantizer(model, split_samples(feeds), QuantSettings()) as q:
        errors = [
            np.linalg.norm(run_model(q.quantize(exclude=kept), feeds)["y"] - ref) / np.linalg.norm(ref)
            for kept in ([], ["fc1"], ["fc1", "fc0"], ["fc1", "fc0", "fc2"])
        ]
    assert errors == sorted(errors, reverse=True) and errors[-1] == 0.0, errors


def test_budget_that_cannot_be_met_undoes_everything_with_a_reason():
    model = mlp([16, 32, 8])
    with pytest.raises(BudgetError, match="int8: undone"):
        _run(model, max_error=1e-7)
    feeds = synthetic_inputs(model, samples=8, seed=1)
    ctx = ModelContext(feeds, OutputBudget(model, feeds, 1e-7), {})
    got = Int8().run(model, ctx)
    assert not got.changed and got.model is model and got.failure
    assert all(r.status == "undone" and "over budget" in r.reason for r in got.records)
    assert all(isinstance(r.detail["sensitivity"], float) for r in got.records)  # measured, then undone
    got = Int8().run(model, ModelContext(feeds, ctx.budget, {"control": "0"}))
    assert not got.changed and all("not measured" in r.detail["sensitivity"] for r in got.records)


def _dynamic_size_conv() -> onnx.ModelProto:
    model = conv_net([3, 6, 4], size=8)
    for vi in (model.graph.input[0], model.graph.output[0]):
        for d, name in zip(vi.type.tensor_type.shape.dim[2:], ("H", "W"), strict=True):
            d.ClearField("dim_value")
            d.dim_param = name
    return model


@pytest.mark.parametrize("calibrate", ["minmax", "percentile"])
def test_calibration_samples_of_varying_shapes(calibrate):
    # (onnxruntime's histogram calibrator stacks the samples of one collect_data call: fed all at once,
    # shapes that differ fail)
    model = _dynamic_size_conv()
    rng = np.random.default_rng(0)
    samples = [
        {"x": rng.standard_normal((1, 3, h, w)).astype(np.float32)} for h, w in [(8, 8), (12, 9), (5, 16)]
    ]
    samples *= 3
    feeds = {"x": rng.standard_normal((4, 3, 10, 7)).astype(np.float32)}
    settings = {"int8": {"calibrate": calibrate}}
    budget = OutputBudget(model, feeds, 5e-2)
    result = optimize(model, [Int8()], feeds, budget, settings=settings, samples=samples)
    assert all(r.status == "applied" for r in _int8(result).values())
    for s in samples[:3]:  # every shape runs and stays close
        ref, got = run_model(model, s)["y"], run_model(result.model, s)["y"]
        assert got.shape == ref.shape and np.linalg.norm(got - ref) <= 0.1 * np.linalg.norm(ref)


def test_composes_after_lowrank():
    model = mlp([96, 96, 96, 16], decay=0.8, use_gemm=False)
    result, feeds = _run(model, max_error=5e-2, methods=("lowrank", "int8"))
    lowrank = [r for r in result.records if r.method == "lowrank" and r.status == "applied"]
    assert lowrank, [r.as_dict() for r in result.records]
    recs = _int8(result)
    # int8 sees the model lowrank produced: its factor MatMuls are layers too
    assert any(name.startswith(lowrank[0].node + "/lowrank") for name in recs)
    assert any(r.status == "applied" for r in recs.values())
    assert max(e.rel_l2 for e in compare_models(model, result.model, feeds)) <= 5e-2


def test_onnxopt_custom_ops_are_left_alone():
    # fc0 is exactly block-circulant: the circulant pass makes it a CirculantMatMul (domain onnxopt), which
    # the calibration session must be able to run and the quantizer must not touch.
    model = mlp([96, 80, 10], seed=5)
    C = (np.random.default_rng(6).standard_normal((6, 5, 16)) / np.sqrt(96)).astype(np.float32)
    w0 = numpy_helper.from_array(dense_weight(C, signs(96)).astype(np.float32), "W0")
    next(t for t in model.graph.initializer if t.name == "W0").CopyFrom(w0)
    result, feeds = _run(model, max_error=5e-2, methods=("circulant", "int8"))
    custom = [n for n in result.model.graph.node if n.domain == "onnxopt"]
    assert [n.op_type for n in custom] == ["CirculantMatMul"], [r.as_dict() for r in result.records]
    assert not any(i.endswith("DequantizeLinear_Output") for n in custom for i in n.input[1:])
    recs = _int8(result)
    assert recs["fc1"].status == "applied" and "fc0" not in recs
    assert max(e.rel_l2 for e in compare_models(model, result.model, feeds)) <= 5e-2


def test_calibration_data_that_does_not_fit_is_a_user_error():
    model = mlp([16, 32, 8])
    feeds = synthetic_inputs(model, samples=4)
    bad_width = [{"x": np.zeros((1, 17), np.float32)}]
    ctx = ModelContext(feeds, OutputBudget(model, feeds, 5e-2), {}, samples=bad_width)
    with pytest.raises(UserError, match="calibration failed on this data"):
        Int8().run(model, ctx)
    for bad in ([{"x": np.zeros((1, 16), np.float64)}], [{"y": np.zeros((1, 16), np.float32)}]):
        with pytest.raises(UserError, match="calibration sample 0"):
            Int8().run(model, ModelContext(feeds, ctx.budget, {}, samples=bad))


def test_unsupported_dtype_and_settings_are_user_errors():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float16), "W")
    half = helper.make_model(
        helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g", [x], [y], [w])
    )
    feeds = {"x": np.ones((2, 4), np.float16)}
    with pytest.raises(UserError, match="float16"):
        Int8().run(half, ModelContext(feeds, None, {}))
    model = mlp([16, 32, 8])
    feeds = synthetic_inputs(model, samples=4)
    for settings in (
        {"mode": "int4"},
        {"bits": "8"},
        {"calibrate": "entropy"},
        {"probe": "x"},
        {"control": "2"},
    ):
        with pytest.raises(UserError):
            Int8().run(model, ModelContext(feeds, OutputBudget(model, feeds, 5e-2), settings))


def test_samples_file_of_varying_shapes(tmp_path):
    model = _dynamic_size_conv()
    rng = np.random.default_rng(2)
    shapes = [(8, 8), (12, 9), (5, 16), (7, 7)]
    arrays = {
        f"x/{i}": rng.standard_normal((1, 3, h, w)).astype(np.float32) for i, (h, w) in enumerate(shapes)
    }
    np.savez(tmp_path / "widths.npz", **arrays)
    assert [s["x"].shape for s in load_samples(tmp_path / "widths.npz", model)] == [
        (1, 3, h, w) for h, w in shapes
    ]
    feeds = {"x": rng.standard_normal((4, 3, 10, 7)).astype(np.float32)}
    settings = {"int8": {"samples": str(tmp_path / "widths.npz"), "mode": "static"}}
    result = optimize(model, [Int8()], feeds, OutputBudget(model, feeds, 5e-2), settings=settings)
    assert all(r.status == "applied" for r in _int8(result).values())
    np.savez(tmp_path / "bad.npz", **{"x/0": arrays["x/0"], "x/1": np.zeros((1, 4, 8, 8), np.float32)})
    with pytest.raises(UserError, match="sample 1"):
        load_samples(tmp_path / "bad.npz", model)
    np.savez(tmp_path / "keys.npz", x=arrays["x/0"])
    with pytest.raises(UserError, match="<input>/<sample number>"):
        load_samples(tmp_path / "keys.npz", model)
