"""filter_prune: the selection and merge on their own, the propagation through BatchNormalization, Relu,
MaxPool, AveragePool and Flatten -> Gemm (exact when the removed filters are all zero, three Convs in a chain
all pruned), the declines with their reasons, the merge against plain removal, monotonicity, the consumer
owned against later passes, and the real Fashion-MNIST model."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.synthetic import OPSET
from onnxopt.budget import OutputBudget
from onnxopt.graph import normalize
from onnxopt.manager import build, optimize, plan
from onnxopt.passes import METHODS, filter_fit
from onnxopt.passes.filter_prune import FilterPrune, keep_counts
from onnxopt.passes.lowrank import LowRank
from onnxopt.verify import run_model

# ------------------------------------------------------------------------------------------------ numpy


def test_merge_order_is_a_permutation_and_drops_the_redundant_first():
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((500, 6))
    Y[:, 4] = Y[:, 0] - 2 * Y[:, 1]  # exactly a combination of two others
    Y[:, 5] = 3.0  # a constant map (a saturated filter)
    order = filter_fit.merge_order(filter_fit.gram(Y), np.ones(6))
    assert sorted(order.tolist()) == list(range(6))
    # the constant goes, and one of the three maps that are combinations of each other
    assert 5 in order[-2:] and len({0, 1, 4} & set(order[-2:].tolist())) == 1


def test_merge_is_exact_for_a_combination_and_a_constant():
    rng = np.random.default_rng(1)
    Y = rng.standard_normal((400, 5))
    Y[:, 3] = 0.5 * Y[:, 0] + Y[:, 2]
    Y[:, 4] = -1.5
    Wc = rng.standard_normal((5, 3, 7))
    b = rng.standard_normal(7)
    keep = np.array([0, 1, 2])
    alpha, beta = filter_fit.merge_coefficients(filter_fit.gram(Y), keep, intercept=True)
    W_new, b_new = filter_fit.consumer_update(Wc, b, keep, alpha, beta)
    P = np.repeat(Y, 3, axis=1)  # k = 3 columns per channel, channel-major
    ref = filter_fit.consumer_output(P, Wc, b)
    assert filter_fit.consumer_error(P, ref, keep, W_new, b_new) < 1e-5
    plain = filter_fit.consumer_update(Wc, b, keep, None, None)
    assert filter_fit.consumer_error(P, ref, keep, *plain) > 0.1


def test_l1_and_apoz_orders():
    W = np.zeros((4, 2, 3, 3), np.float32)
    W[0], W[2], W[3] = 1.0, 3.0, 2.0
    assert filter_fit.l1_order(W).tolist() == [2, 3, 0, 1]
    A = np.ones((2, 3, 4, 4))
    A[:, 1] = 0.0
    A[:, 2, :2] = 0.0
    assert filter_fit.apoz_order(A).tolist() == [0, 2, 1]


def test_keep_counts():
    assert keep_counts(8) == [1, 2, 3, 4, 5, 6, 7]
    assert keep_counts(64)[0] == 8 and keep_counts(64)[-2:] == [60, 62] and keep_counts(2) == [1]


# ----------------------------------------------------------------------------------------------- graphs


def _conv(name, x, y, W, b, pads=1, **attrs):
    inits = [numpy_helper.from_array(W, f"{name}.W"), numpy_helper.from_array(b, f"{name}.B")]
    k = list(W.shape[2:])
    node = helper.make_node(
        "Conv", [x, f"{name}.W", f"{name}.B"], [y], name=name, kernel_shape=k, pads=[pads] * 4, **attrs
    )
    return node, inits


def _weights(rng, m, c, zero=()):
    """He-scaled filters and biases, the filters in `zero` all zero (weights and bias)."""
    W = (rng.standard_normal((m, c, 3, 3)) * np.sqrt(2.0 / (9 * c))).astype(np.float32)
    b = (0.1 * rng.standard_normal(m)).astype(np.float32)
    W[list(zero)], b[list(zero)] = 0.0, 0.0
    return W, b


def chain_model(zero=((), (), ())) -> onnx.ModelProto:
    """x [N, 3, 8, 8] -> conv1 (8) -> BN -> Relu -> MaxPool 2 -> conv2 (8) -> Relu -> conv3 (6) -> Relu
    -> AveragePool 2 -> Flatten (6 channels x 2 x 2) -> Gemm (transB) -> y [N, 5]; `zero[i]` are the
    all-zero filters of conv i+1 (BN maps them to zero too)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for i, (x, y, m, c) in enumerate([("x", "c1", 8, 3), ("p1", "c2", 8, 8), ("r2", "c3", 6, 8)]):
        node, init = _conv(f"conv{i + 1}", x, y, *_weights(rng, m, c, zero[i]))
        nodes.append(node)
        inits += init
        if i == 0:
            scale, mean = rng.uniform(0.5, 1.5, 8), 0.1 * rng.standard_normal(8)
            bias, var = 0.1 * rng.standard_normal(8), rng.uniform(0.5, 1.5, 8)
            mean[list(zero[0])], bias[list(zero[0])] = 0.0, 0.0
            for n, v in zip(("s", "b", "m", "v"), (scale, bias, mean, var), strict=True):
                inits.append(numpy_helper.from_array(v.astype(np.float32), f"bn.{n}"))
            nodes.append(
                helper.make_node(
                    "BatchNormalization", ["c1", "bn.s", "bn.b", "bn.m", "bn.v"], ["n1"], name="bn"
                )
            )
            nodes.append(helper.make_node("Relu", ["n1"], ["r1"], name="relu1"))
            nodes.append(
                helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2])
            )
        else:
            nodes.append(helper.make_node("Relu", [f"c{i + 1}"], [f"r{i + 1}"], name=f"relu{i + 1}"))
    nodes.append(
        helper.make_node("AveragePool", ["r3"], ["a3"], name="avg", kernel_shape=[2, 2], strides=[2, 2])
    )
    nodes.append(helper.make_node("Flatten", ["a3"], ["f"], name="flatten", axis=1))
    fc = rng.standard_normal((5, 24)).astype(np.float32) * 0.3
    inits += [numpy_helper.from_array(fc, "fc.W"), numpy_helper.from_array(np.ones(5, np.float32), "fc.B")]
    nodes.append(
        helper.make_node("Gemm", ["f", "fc.W", "fc.B"], ["y"], name="fc", transB=1, alpha=0.5, beta=2.0)
    )
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(model, n=32, seed=0):
    shape = [n, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]]
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def _plan(model, feeds, settings=None, passes=None, max_error=1e-2):
    normalize(model)
    passes = passes or [FilterPrune()]
    cands, declined = plan(model, passes, feeds, max_error, {"filter_prune": settings or {}})
    return passes, cands, declined


def _choose_kept(cands, kept: dict[str, int]):
    """Each candidate takes the option keeping kept[name] filters, or none when not named."""
    for c in cands:
        if c.record.node in kept:
            c.choice = next(
                i for i, o in enumerate(c.options) if o.detail["kept_filters"] == kept[c.record.node]
            )
        else:
            c.choice = len(c.options)


def _weight_shapes(model):
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    return {
        n.op_type + ":" + n.name: inits[n.input[1]] for n in model.graph.node if n.op_type in ("Conv", "Gemm")
    }


@pytest.mark.parametrize("criterion", ["merge", "apoz", "l1"])
@pytest.mark.parametrize("reconstruct", ["1", "0"])
def test_zero_filters_removed_exactly_through_bn_relu_pool(criterion, reconstruct):
    model = chain_model(zero=((2, 5), (), ()))
    feeds = _feeds(model)
    passes, cands, _ = _plan(model, feeds, {"criterion": criterion, "reconstruct": reconstruct})
    assert {c.record.node for c in cands} == {"conv1", "conv2", "conv3"}
    _choose_kept(cands, {"conv1": 6})
    (c1,) = [c for c in cands if c.record.node == "conv1"]
    assert sorted(set(range(8)) - set(c1.option.detail["kept"])) == [2, 5]
    assert c1.option.est_error < 1e-5
    out = build(model, passes, cands)
    onnx.checker.check_model(out, full_check=True)
    shapes = _weight_shapes(out)
    assert [8, 6, 3, 3] in shapes.values() and [6, 3, 3, 3] in shapes.values()
    ref, got = run_model(model, feeds)["y"], run_model(out, feeds)["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_three_convs_in_a_chain_all_pruned_exactly():
    model = chain_model(zero=((0, 7), (1, 3), (4, 5)))
    feeds = _feeds(model)
    passes, cands, _ = _plan(model, feeds, {"criterion": "l1"})
    _choose_kept(cands, {"conv1": 6, "conv2": 6, "conv3": 4})
    out = build(model, passes, cands)
    onnx.checker.check_model(out, full_check=True)
    shapes = _weight_shapes(out)
    # conv2 lost 2 filters and 2 input channels; the Gemm lost 2 channels of 2 x 2 rows each
    assert sorted(shapes.values()) == sorted([[6, 3, 3, 3], [6, 6, 3, 3], [4, 6, 3, 3], [5, 16]])
    ref, got = run_model(model, feeds)["y"], run_model(out, feeds)["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    records = {c.record.node: c for c in cands}
    fc_flops_before = 2 * 32 * 5 * 24  # N = 32 calibration rows
    r3 = records["conv3"]
    assert r3.record.flops_before - r3.option.flops_after >= fc_flops_before // 3  # the Gemm's FLOPs fall too
    assert r3.option.detail["nodes_touched"] == ["conv3", "relu3", "avg", "flatten", "fc"]


def test_merge_beats_plain_removal_and_more_filters_less_error():
    model = chain_model()
    feeds = _feeds(model, n=160)
    errors = {}
    for reconstruct in ("1", "0"):
        settings = {"reconstruct": reconstruct, "criterion": "l1"}
        _, cands, _ = _plan(chain_model(), feeds, settings, max_error=1.0)
        errors[reconstruct] = {
            c.record.node: {o.detail["kept_filters"]: o.est_error for o in c.options} for c in cands
        }
    for node, merged in errors["1"].items():
        plain = errors["0"][node]
        common = set(merged) & set(plain)
        assert len(common) >= 2, (node, merged, plain)
        for k in common:
            assert merged[k] <= plain[k] + 1e-9, (node, k)
        assert any(merged[k] < 0.9 * plain[k] for k in common), node
        ks = sorted(merged)
        assert all(merged[a] >= merged[b] - 1e-6 for a, b in itertools.pairwise(ks)), (node, merged)


def _residual_and_concat_model() -> onnx.ModelProto:
    """x -> a -> Relu -> b -> (b + Relu(a)) -> out1; x -> c, d -> Concat -> e -> y; grouped g -> h -> z;
    x -> o (a graph output)."""
    rng = np.random.default_rng(2)
    nodes, inits = [], []

    def conv(name, x, y, m, c, **attrs):
        W = rng.standard_normal((m, c // attrs.get("group", 1), 3, 3)).astype(np.float32)
        node, init = _conv(name, x, y, W, np.zeros(m, np.float32), **attrs)
        nodes.append(node)
        inits.extend(init)

    conv("a", "x", "a_y", 4, 4)
    nodes.append(helper.make_node("Relu", ["a_y"], ["a_r"], name="a_relu"))
    conv("b", "a_r", "b_y", 4, 4)
    nodes.append(helper.make_node("Add", ["b_y", "a_r"], ["out1"], name="add"))
    conv("c", "x", "c_y", 4, 4)
    conv("d", "x", "d_y", 4, 4)
    nodes.append(helper.make_node("Concat", ["c_y", "d_y"], ["cat"], name="cat", axis=1))
    conv("e", "cat", "y", 4, 8)
    conv("g", "x", "g_y", 4, 4, group=2)
    conv("h", "g_y", "z", 4, 4)
    conv("o", "x", "o_y", 4, 4)
    outs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4, 6, 6]) for n in ("out1", "y", "z", "o_y")
    ]
    graph = helper.make_graph(
        nodes,
        "declines",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        outs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def test_declines_with_reasons():
    model = _residual_and_concat_model()
    _, cands, declined = _plan(model, _feeds(model, n=4), max_error=1.0)
    reasons = {r.node: r.reason for r in declined}
    # c and d (into one Concat) are one candidate of two channel groups (test_filter_prune_groups.py)
    assert [c.record.node for c in cands] == ["c"]
    assert "out1 is a graph output" in reasons["a"]  # its Relu output feeds b and the residual Add
    assert "out1 is a graph output" in reasons["b"]  # the residual sum
    assert "pruned as one group at c" in reasons["d"]
    assert (
        "graph output" in reasons["e"] and "graph output" in reasons["h"] and "graph output" in reasons["o"]
    )
    assert "group=2" in reasons["g"]


def test_bad_setting_is_declined():
    model = chain_model()
    _, cands, declined = _plan(model, _feeds(model), {"criterion": "random"})
    assert not cands and all("criterion 'random'" in r.reason for r in declined)


def test_consumer_is_owned_against_later_passes():
    model = chain_model()
    feeds = _feeds(model, n=64)
    passes, cands, declined = _plan(model, feeds, passes=[FilterPrune(), LowRank()])
    assert "conv3" in {c.record.node for c in cands if c.record.method == "filter_prune"}
    (owned,) = [r for r in declined if r.method == "lowrank"]  # conv3's consumer
    assert owned.node == "fc" and owned.reason.startswith("its rewrite by filter_prune of conv3")
    result = optimize(model, passes, feeds, OutputBudget(model, feeds, 0.5), 0.5, settings={})
    onnx.checker.check_model(result.model, full_check=True)


def test_registered_first_and_opt_in():
    assert next(iter(METHODS)) == "filter_prune" and METHODS["filter_prune"] is FilterPrune
    assert not FilterPrune.default


def test_fashion_mnist_flops_fall_within_the_default_budget(tmp_path):
    from models import fashion_mnist
    from onnxopt.analysis import node_stats, totals
    from onnxopt.data import load_npz

    root = Path(__file__).resolve().parents[2]
    model = onnx.load(str(root / "models" / "fashion_mnist.onnx"))
    feeds = load_npz(fashion_mnist.write_calibration(tmp_path / "fmnist.npz", n=64), model)
    budget = OutputBudget(model, feeds, 1e-2)
    result = optimize(model, [FilterPrune()], feeds, budget, 1e-2)
    onnx.checker.check_model(result.model, full_check=True)
    assert result.verification["worst_rel_l2"] <= 1e-2
    assert totals(node_stats(result.model))["flops"] < totals(node_stats(model))["flops"]
    applied = [r for r in result.records if r.status == "applied"]
    assert applied and all(r.flops_after < r.flops_before for r in applied)


def test_resnet18_graph_stays_valid():
    """Random weights, so only the graph: block-internal Convs are pruned alone, the Convs feeding a stage's
    residual Adds as one group per stage, and the smaller model passes the checker and shape inference."""
    from models.cnn import resnet18

    model = resnet18(size=32, batch="N")
    feeds = _feeds(model, n=2)
    # a graph test: the cheapest selection and no re-fit (the propagation is the same)
    passes, cands, declined = _plan(model, feeds, {"criterion": "l1", "reconstruct": "0"}, max_error=1.0)
    assert len(cands) == 12  # the first Conv of each of the 8 basic blocks, and the 4 stages' groups
    assert all("pruned as one group" in r.reason for r in declined)
    _choose_kept(cands, {c.record.node: c.options[0].detail["kept_filters"] for c in cands})
    out = build(model, passes, cands)
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, strict_mode=True)
    assert run_model(out, feeds)[out.graph.output[0].name].shape == (2, 1000)


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_flatten_into_a_consumer_without_bias(op):
    """conv (6, filters 1 and 4 zero) -> Relu -> Flatten -> MatMul, or Gemm without C: the MatMul gains no
    bias input (it has none), the Gemm may gain one; both exact."""
    rng = np.random.default_rng(3)
    W, b = _weights(rng, 6, 2, zero=(1, 4))
    node, inits = _conv("conv", "x", "c", W, b)
    fc = rng.standard_normal((6 * 16, 3)).astype(np.float32)
    inits.append(numpy_helper.from_array(fc, "fc.W"))
    nodes = [
        node,
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
        helper.make_node(op, ["f", "fc.W"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "flat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    feeds = _feeds(model, n=64)
    passes, cands, _ = _plan(model, feeds)
    _choose_kept(cands, {"conv": 4})
    out = build(model, passes, cands)
    onnx.checker.check_model(out, full_check=True)
    (fc_node,) = [n for n in out.graph.node if n.op_type == op]
    if op == "MatMul":
        assert len(fc_node.input) == 2
    np.testing.assert_allclose(run_model(out, feeds)["y"], run_model(model, feeds)["y"], rtol=1e-5, atol=1e-5)
