"""depthwise pass: which convolutions it takes, the Relu/Clip it fuses, why it declines the others, and
exactness of the result."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from models.synthetic import conv_net, mobilenet_block
from onnxopt.analysis import node_stats, tensor_shapes
from onnxopt.budget import OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.manager import optimize
from onnxopt.passes.depthwise import Depthwise
from onnxopt.rewrite import PassContext
from onnxopt.verify import compare_models
from tolerances import REL_L2, tol


def _run(model, samples=3, measure=False):
    """Optimize with depthwise; by default without timing, so that every eligible layer is rewritten."""
    feeds = synthetic_inputs(model, samples=samples, seed=4)
    settings = {} if measure else {"depthwise": {"measure": "0"}}
    return optimize(model, [Depthwise()], feeds, OutputBudget(model, feeds, 1e-2), settings=settings), feeds


def _max_error(model, result, feeds) -> float:
    return max(e.rel_l2 for e in compare_models(model, result.model, feeds))


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("activation", ["clip", "relu", "none"])
def test_mobilenet_block_depthwise_fused_and_exact(stride, activation):
    model = mobilenet_block(channels=5, expand=3, size=11, stride=stride, activation=activation)
    result, feeds = _run(model)
    ops = [n.op_type for n in result.model.graph.node]
    what = f"stride={stride} activation={activation}: {ops}"
    # The expand activation stays (it follows a 1x1 Conv); the depthwise one is inside DepthwiseConv.
    expand_act = {"clip": ["Clip"], "relu": ["Relu"], "none": []}[activation]
    expected = ["Conv", *expand_act, "DepthwiseConv", "Conv"]
    assert ops == expected, what
    (dw,) = [n for n in result.model.graph.node if n.op_type == "DepthwiseConv"]
    assert dw.domain == "onnxopt"
    a = _attrs(dw)
    assert a["strides"] == [stride, stride] and a["pads"] == [1, 1, 1, 1] and a["group"] == 15, what
    assert a.get("activation", b"").decode() == ("" if activation == "none" else activation), what
    if activation == "clip":
        assert (a["clip_min"], a["clip_max"]) == (0.0, 6.0), what
    onnx.checker.check_model(result.model)
    err = _max_error(model, result, feeds)
    assert err <= tol("float32", REL_L2), f"{what}: rel L2 {err:.3e}"
    (rec,) = [r for r in result.records if r.status == "applied"]
    assert rec.flops_after == rec.flops_before and rec.est_error == 0.0
    assert rec.detail["fused"] == ("" if activation == "none" else activation)


def test_conv_net_of_depthwise_layers():
    model = conv_net([8, 8, 8], size=9, pads=1, group=8)
    result, feeds = _run(model)
    ops = [n.op_type for n in result.model.graph.node]
    # relu0 is fused; the last conv writes the graph output and has nothing to fuse.
    assert ops == ["DepthwiseConv", "DepthwiseConv"], ops
    onnx.checker.check_model(result.model)
    assert _max_error(model, result, feeds) <= tol("float32", REL_L2)


@pytest.mark.parametrize("how", ["graph-output", "two-consumers"])
def test_activation_not_fused_when_the_conv_output_is_used_elsewhere(how):
    model = conv_net([8, 8, 8], size=9, pads=1, group=8)
    if how == "graph-output":
        model.graph.output.append(helper.make_tensor_value_info("c0", onnx.TensorProto.FLOAT, ["N", 8, 9, 9]))
    else:
        model.graph.node.append(helper.make_node("Add", ["c0", "h0"], ["z"], name="add"))
        model.graph.output.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 8, 9, 9]))
    result, feeds = _run(model)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("DepthwiseConv") == 2 and "Relu" in ops, ops
    first = next(n for n in result.model.graph.node if n.op_type == "DepthwiseConv" and "c0" in n.output)
    assert "activation" not in _attrs(first)
    assert _max_error(model, result, feeds) <= tol("float32", REL_L2)


def _weight_as_input(model):
    w = next(t for t in model.graph.initializer if t.name == "W0")
    model.graph.input.append(helper.make_tensor_value_info("W0", w.data_type, list(w.dims)))
    model.graph.initializer.remove(w)
    return model


def _dilated(model):
    model.graph.node[0].attribute.append(helper.make_attribute("dilations", [2, 2]))
    return model


@pytest.mark.parametrize(
    "build,reason",
    [
        (lambda: _dilated(conv_net([8, 8], size=10, group=8)), "dilation"),
        (lambda: conv_net([8, 8], size=10, group=8, strides=3), "stride"),
        (lambda: conv_net([8, 8], size=10, group=8, kernel=5, pads=2), "3x3"),
        (lambda: conv_net([8, 8], size=10, group=2), "not depthwise"),
        (lambda: conv_net([8, 8], size=10), "not depthwise"),
    ],
    ids=["dilation", "stride-3", "5x5", "group-2", "group-1"],
)
def test_unsupported_convs_declined_with_reason(build, reason):
    model = build()
    result, _ = _run(model, samples=2)
    assert not result.changed
    assert [r.status for r in result.records] == ["declined"]
    assert reason in result.records[0].reason, result.records[0].reason


def test_weight_that_is_not_constant_declined():
    model = _weight_as_input(conv_net([8, 8], size=10, group=8))
    graph = gs.import_onnx(model)
    ctx = PassContext(graph, tensor_shapes(model), 1e-2, {})
    conv = next(n for n in graph.nodes if n.op == "Conv")
    assert "not a constant" in Depthwise().check(conv, ctx)


def test_flops_and_shapes_of_the_rewritten_model():
    model = mobilenet_block(channels=4, expand=2, size=10, stride=2)
    result, _ = _run(model)
    before = {s.name: s.flops for s in node_stats(model)}
    after = {s.op_type: s.flops for s in node_stats(result.model)}
    assert after["DepthwiseConv"] == before["depthwise"] == 2 * 8 * 5 * 5 * 9
    shapes = tensor_shapes(result.model)
    assert shapes["d_act"] == (1, 8, 5, 5)


def test_not_in_default_set():
    from onnxopt.passes import METHODS, default_methods

    assert "depthwise" in METHODS and "depthwise" not in default_methods()


def test_measured_layers_record_their_times_or_decline_as_slower():
    model = conv_net([16, 16, 16], size=20, pads=1, group=16)
    result, _ = _run(model, measure=True)
    assert len(result.records) == 2
    for r in result.records:
        if r.status == "applied":
            assert r.detail["ms_before"] > 0 and r.detail["ms_after"] > 0 and r.detail["threads"] == 1
        else:
            assert r.status in ("declined", "undone"), r
            assert r.reason.startswith(("not faster:", "undone: the whole model")), r.reason
