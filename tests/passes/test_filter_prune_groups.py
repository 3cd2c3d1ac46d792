"""filter_prune of channel groups: the inputs of one channel-axis Concat pruned together, one input at two
offsets through a pool, a group through a depthwise Conv, scalar and per-channel constants and a Resize, a
residual stage of two blocks (identity and projection shortcuts) pruned exactly when the removed channels
are zero in every producer, one Conv both producer and consumer of its group, the declines (an identity
shortcut from the graph input, a grouped producer, a constant that is not per channel), and the
ResNet-18-shaped graph: valid, unchanged numerics when every channel is kept, FLOPs down when channels go."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.synthetic import OPSET
from onnxopt.graph import normalize
from onnxopt.manager import build, plan
from onnxopt.passes.filter_prune import FilterPrune
from onnxopt.verify import run_model


class _Net:
    """A small graph builder: 3x3 (or 1x1) convs with He weights, the filters in `zero` all zero."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def conv(self, name, x, m, c, zero=(), k=3, **attrs):
        W = (
            self.rng.standard_normal((m, c // attrs.get("group", 1), k, k)) * np.sqrt(2 / (c * k * k))
        ).astype(np.float32)
        b = (0.1 * self.rng.standard_normal(m)).astype(np.float32)
        W[list(zero)], b[list(zero)] = 0.0, 0.0
        self.inits += [numpy_helper.from_array(W, f"{name}.W"), numpy_helper.from_array(b, f"{name}.B")]
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.W", f"{name}.B"],
                [name],
                name=name,
                kernel_shape=[k, k],
                pads=[k // 2] * 4,
                **attrs,
            )
        )
        return name

    def op(self, op, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def bn(self, x, name, c, zero=()):
        scale, bias = self.rng.uniform(0.5, 1.5, c), 0.1 * self.rng.standard_normal(c)
        mean, var = 0.1 * self.rng.standard_normal(c), self.rng.uniform(0.5, 1.5, c)
        # a zero channel stays exactly zero: BN maps 0 to bias - scale mean / sqrt(var + eps)
        bias[list(zero)], mean[list(zero)] = 0.0, 0.0
        for n, v in zip(("s", "b", "m", "v"), (scale, bias, mean, var), strict=True):
            self.inits.append(numpy_helper.from_array(v.astype(np.float32), f"{name}.{n}"))
        return self.op("BatchNormalization", [x, *(f"{name}.{n}" for n in "sbmv")], name)

    def model(self, c: int, size: int, outputs: dict[str, list]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "groups",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, size, size])],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        onnx.checker.check_model(model, full_check=True)
        normalize(model)
        return model


def _feeds(model, n=32, seed=0):
    shape = [n, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]]
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _plan(model, feeds, settings=None, max_error=1.0):
    passes = [FilterPrune()]
    cands, declined = plan(model, passes, feeds, max_error, {"filter_prune": settings or {}})
    return passes, cands, declined


def _choose(cands, kept: dict[str, int]):
    for c in cands:
        c.choice = len(c.options)
        if c.record.node in kept:
            c.choice = next(
                i for i, o in enumerate(c.options) if o.detail["kept_filters"] == kept[c.record.node]
            )


def _weights(model):
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    # a chain candidate's Conv is replaced by "<name>/filter_prune/conv"; a group's keep their names
    return {
        n.name.split("/")[0]: inits[n.input[1]] for n in model.graph.node if n.op_type in ("Conv", "Gemm")
    }


def _check_exact(model, out, feeds):
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, strict_mode=True)
    ref, got = run_model(model, feeds), run_model(out, feeds)
    for name, value in ref.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ Concat


def concat_model() -> onnx.ModelProto:
    """x -> c (6, filters 1 and 4 zero) -> Relu; x -> d (4, filter 0 and 3 zero); Concat(c, d) -> BN -> Relu
    -> e (5) -> y."""
    net = _Net(1)
    r = net.op("Relu", [net.conv("c", "x", 6, 3, zero=(1, 4))], "c_relu")
    cat = net.op("Concat", [r, net.conv("d", "x", 4, 3, zero=(0, 3))], "cat", axis=1)
    e = net.conv("e", net.op("Relu", [net.bn(cat, "bn", 10, zero=(1, 4, 6, 9))], "cat_relu"), 5, 10)
    return net.model(3, 8, {e: ["N", 5, 8, 8]})


@pytest.mark.parametrize("criterion", ["merge", "apoz", "l1"])
def test_concat_inputs_pruned_together_exactly(criterion):
    """c and d, the two inputs of one Concat, are one candidate: each keeps 5/8 of its filters."""
    model = concat_model()
    feeds = _feeds(model)
    passes, cands, declined = _plan(model, feeds, {"criterion": criterion}, max_error=1e-4)
    assert [c.record.node for c in cands] == ["c"]
    assert "pruned as one group at c" in {r.node: r.reason for r in declined}["d"]
    _choose(cands, {"c": 6})  # 4 of c's 6 and 2 of d's 4
    (c,) = cands
    kept_c, kept_d = c.option.detail["kept"]
    assert sorted(set(range(6)) - set(kept_c)) == [1, 4] and sorted(set(range(4)) - set(kept_d)) == [0, 3]
    assert c.option.detail["concats"] == ["cat"] and c.option.est_error < 1e-5
    out = build(model, passes, cands)
    w = _weights(out)
    assert w["c"] == [4, 3, 3, 3] and w["d"] == [2, 3, 3, 3] and w["e"] == [5, 6, 3, 3]
    bn = next(n for n in out.graph.node if n.op_type == "BatchNormalization")
    assert [list(t.dims) for t in out.graph.initializer if t.name == bn.input[1]] == [[6]]
    _check_exact(model, out, feeds)
    assert c.option.flops_after < c.record.flops_before


def test_concat_at_two_offsets_through_a_pool():
    """An SPPF-like Concat(r, MaxPool(r)): the group sits at offsets 0 and 4 of the concatenation."""
    net = _Net(2)
    r = net.op("Relu", [net.conv("c", "x", 4, 3, zero=(2,))], "r")
    pooled = net.op("MaxPool", [r], "pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    e = net.conv("e", net.op("Concat", [r, pooled], "cat", axis=1), 3, 8, k=1)
    model = net.model(3, 8, {e: ["N", 3, 8, 8]})
    feeds = _feeds(model)
    passes, cands, _ = _plan(model, feeds, {"criterion": "l1"})
    _choose(cands, {"c": 3})
    out = build(model, passes, cands)
    assert _weights(out)["e"] == [3, 6, 1, 1]
    _check_exact(model, out, feeds)


def test_through_depthwise_scalar_and_channel_constants_and_resize():
    """p (8, filters 2 and 5 zero) -> Relu -> depthwise 3x3 -> * 0.5 -> + k [1, 8, 1, 1] -> Resize x2 ->
    e (1x1): the depthwise filters, k and e's input channels are sliced; exact (the removed maps are 0)."""
    net = _Net(5)
    r = net.op("Relu", [net.conv("p", "x", 8, 3, zero=(2, 5))], "p_relu")
    dw = net.conv("dw", r, 8, 8, zero=(2, 5), group=8)
    k = np.linspace(-1, 1, 8).astype(np.float32).reshape(1, 8, 1, 1)
    k[0, [2, 5]] = 0.0
    net.inits += [
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(k, "k"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
    ]
    h = net.op("Add", [net.op("Mul", [dw, "half"], "mul"), "k"], "add")
    up = net.op("Resize", [h, "", "scales"], "up", mode="nearest")
    e = net.conv("e", up, 4, 8, k=1)
    model = net.model(3, 6, {e: ["N", 4, 12, 12]})
    feeds = _feeds(model)
    passes, cands, declined = _plan(model, feeds, {"criterion": "l1"}, max_error=1e-4)
    assert [c.record.node for c in cands] == ["p"], [(r.node, r.reason) for r in declined]
    _choose(cands, {"p": 6})
    (c,) = cands
    assert c.option.est_error < 1e-5 and c.option.detail["joins"] == ["mul", "add"]
    out = build(model, passes, cands)
    w = _weights(out)
    assert w["p"] == [6, 3, 3, 3] and w["dw"] == [6, 1, 3, 3] and w["e"] == [4, 6, 1, 1]
    (dw_node,) = [n for n in out.graph.node if n.name == "dw"]
    assert {a.name: helper.get_attribute_value(a) for a in dw_node.attribute}["group"] == 6
    _check_exact(model, out, feeds)


def test_declines_a_constant_that_is_not_per_channel():
    net = _Net(6)
    net.inits.append(numpy_helper.from_array(np.ones((1, 4, 6, 6), np.float32), "full"))
    h = net.op("Add", [net.conv("p", "x", 4, 3), "full"], "add")
    e = net.conv("e", h, 4, 4)
    model = net.model(3, 6, {e: ["N", 4, 6, 6]})
    _, cands, declined = _plan(model, _feeds(model, n=4))
    assert not cands
    assert (
        "constant operand full [1, 4, 6, 6] is not per channel" in {r.node: r.reason for r in declined}["p"]
    )


# ---------------------------------------------------------------------------------------------- residual


def residual_stage() -> onnx.ModelProto:
    """stem (8) -> Relu -> s0; block 1, identity: s0 -> a1 (8) -> Relu -> b1 (8) -> BN, + s0 -> Relu -> s1;
    block 2, projection: s1 -> a2 (12) -> Relu -> b2 (12), + p2 (1x1, 12) of s1 -> Relu -> s2 -> GAP ->
    Flatten -> Gemm -> y. Zero filters: 2 and 5 of stem and b1 (the stage's stream), 3 of b2 and p2, 1 and 4
    of a1, 0 and 7 of a2."""
    net = _Net(3)
    s0 = net.op("Relu", [net.conv("stem", "x", 8, 3, zero=(2, 5))], "s0")
    h = net.op("Relu", [net.conv("a1", s0, 8, 8, zero=(1, 4))], "a1_relu")
    b1 = net.bn(net.conv("b1", h, 8, 8, zero=(2, 5)), "b1_bn", 8, zero=(2, 5))
    s1 = net.op("Relu", [net.op("Add", [b1, s0], "add1")], "s1")
    h = net.op("Relu", [net.conv("a2", s1, 12, 8, zero=(0, 7))], "a2_relu")
    b2 = net.conv("b2", h, 12, 12, zero=(3,))
    p2 = net.conv("p2", s1, 12, 8, zero=(3,), k=1)
    s2 = net.op("Relu", [net.op("Add", [b2, p2], "add2")], "s2")
    flat = net.op("Flatten", [net.op("GlobalAveragePool", [s2], "gap")], "flat", axis=1)
    W = (net.rng.standard_normal((12, 5)) * 0.3).astype(np.float32)
    net.inits += [numpy_helper.from_array(W, "fc.W"), numpy_helper.from_array(np.ones(5, np.float32), "fc.B")]
    net.op("Gemm", [flat, "fc.W", "fc.B"], "y")
    return net.model(3, 8, {"y": ["N", 5]})


@pytest.mark.parametrize("criterion", ["merge", "apoz", "l1"])
def test_residual_stage_pruned_jointly_and_exactly(criterion):
    model = residual_stage()
    feeds = _feeds(model)
    # a tight budget: only the exact options (the zero channels removed) are offered
    passes, cands, declined = _plan(model, feeds, {"criterion": criterion}, max_error=1e-4)
    by_node = {c.record.node: c for c in cands}
    assert set(by_node) == {"stem", "a1", "a2", "b2"}
    reasons = {r.node: r.reason for r in declined}
    assert "pruned as one group at stem" in reasons["b1"] and "pruned as one group at b2" in reasons["p2"]
    _choose(cands, {"stem": 6, "a1": 6, "a2": 10, "b2": 11})
    stage = by_node["stem"].option.detail
    assert stage["producers"] == ["stem", "b1"] and stage["consumers"] == ["a1", "a2", "p2"]
    assert stage["joins"] == ["add1"] and sorted(set(range(8)) - set(stage["kept"])) == [2, 5]
    assert by_node["b2"].option.detail["consumers"] == ["y"]
    assert all(c.option.est_error < 1e-4 for c in cands)
    out = build(model, passes, cands)
    w = _weights(out)
    assert w["stem"] == [6, 3, 3, 3] and w["b1"] == [6, 6, 3, 3] and w["p2"] == [11, 6, 1, 1]
    assert w["a2"] == [10, 6, 3, 3] and w["b2"] == [11, 10, 3, 3] and w["y"] == [11, 5]
    _check_exact(model, out, feeds)


def test_residual_group_options_error_grows_as_channels_go():
    model = residual_stage()
    _, cands, _ = _plan(model, _feeds(model, n=64), {"criterion": "merge"}, max_error=1.0)
    stem = next(c for c in cands if c.record.node == "stem")
    kept = [o.detail["kept_filters"] for o in stem.options]
    assert kept == sorted(kept) and len(kept) >= 3
    errors = [o.est_error for o in stem.options]
    assert errors[0] > 0.3 and errors[-1] <= 8 / 128  # the options stop once the error is negligible
    assert all(a >= b - 1e-6 for a, b in itertools.pairwise(errors)), errors
    flops = [o.flops_after for o in stem.options]
    assert flops == sorted(flops) and flops[-1] < stem.record.flops_before


def test_a_conv_both_producer_and_consumer_of_its_group():
    """y = s + r(s): r reads the stream and writes into it, so it loses input channels and filters alike."""
    net = _Net(7)
    s0 = net.op("Relu", [net.conv("stem", "x", 6, 3, zero=(1,))], "s0")
    y = net.op("Add", [s0, net.conv("r", s0, 6, 6, zero=(1,))], "add")
    e = net.conv("e", net.op("Relu", [y], "y_relu"), 4, 6)
    model = net.model(3, 6, {e: ["N", 4, 6, 6]})
    feeds = _feeds(model)
    passes, cands, _ = _plan(model, feeds, {"criterion": "l1"}, max_error=1e-4)
    _choose(cands, {"stem": 5})
    (c,) = cands
    assert c.option.detail["producers"] == ["stem", "r"] and c.option.detail["consumers"] == ["r", "e"]
    out = build(model, passes, cands)
    w = _weights(out)
    assert w["stem"] == [5, 3, 3, 3] and w["r"] == [5, 5, 3, 3] and w["e"] == [4, 5, 3, 3]
    _check_exact(model, out, feeds)


# ---------------------------------------------------------------------------------------------- declines


def test_declines_identity_from_input_and_grouped_producer():
    net = _Net(4)
    h = net.op("Relu", [net.conv("a", "x", 4, 4)], "a_relu")
    y1 = net.conv("e", net.op("Add", [net.conv("b", h, 4, 4), "x"], "add"), 4, 4)  # identity from the input
    g = net.conv("g", "x", 4, 4, group=2)
    y2 = net.conv("f", net.op("Add", [net.conv("c", "x", 4, 4), g], "add2"), 4, 4)  # a grouped producer
    model = net.model(4, 6, {y1: ["N", 4, 6, 6], y2: ["N", 4, 6, 6]})
    _, cands, declined = _plan(model, _feeds(model, n=4))
    reasons = {r.node: r.reason for r in declined}
    assert [c.record.node for c in cands] == ["a"]
    assert "graph input" in reasons["b"] and "identity shortcut" in reasons["b"]
    assert "Conv g writes into the group but cannot lose filters: group=2" in reasons["c"]
    assert "group=2" in reasons["g"]


# ------------------------------------------------------------------------------------------------ ResNet


def _context(model, feeds, tensors):
    """A PassContext on `model` with the calibration values of `tensors` (as the pass manager gives it)."""
    import onnx_graphsurgeon as gs

    from onnxopt.manager import _capture, _consumers
    from onnxopt.rewrite import PassContext
    from onnxopt.verify import complete_shapes

    graph = gs.import_onnx(model)
    activations = _capture(model, feeds, set(tensors))
    return PassContext(graph, complete_shapes(model, feeds), 1.0, {}, activations, _consumers(graph))


def test_resnet18_groups_valid_exact_when_all_kept_and_flops_fall():
    from models.cnn import resnet18
    from onnxopt.analysis import node_stats, totals
    from onnxopt.passes import filter_joint

    model = resnet18(size=32, batch="N")
    normalize(model)
    feeds = _feeds(model, n=4)
    passes, cands, declined = _plan(model, feeds, {"criterion": "l1", "reconstruct": "0"})
    groups = [c for c in cands if "producers" in c.options[0].detail]
    assert len(cands) == 12 and len(groups) == 4  # the first conv of 8 blocks, one group per stage
    assert [len(c.options[0].detail["producers"]) for c in groups] == [3, 3, 3, 3]  # stem or projection + 2
    assert not [r for r in declined if "pruned as one group" not in r.reason]
    # every channel kept: the emit path, plain removal of nothing, must give the same model numerically
    for c in groups:
        group = passes[0]._groups[c.record.node]
        ctx = _context(model, feeds, [r.tensor for r in group.consumers])
        (full,) = filter_joint.group_options(group, ctx, "l1", False, lambda M: [M], 0.0)
        c.options.append(full)
        c.choice = len(c.options) - 1
    for c in cands:
        if c not in groups:
            c.choice = len(c.options)
    out = build(model, passes, cands)
    _check_exact(model, out, feeds)
    # the fewest channels each candidate offers
    for c in cands:
        c.choice = 0
    out = build(model, passes, cands)
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, strict_mode=True)
    assert run_model(out, feeds)[out.graph.output[0].name].shape == (4, 1000)
    assert totals(node_stats(out))["flops"] < 0.2 * totals(node_stats(model))["flops"]
