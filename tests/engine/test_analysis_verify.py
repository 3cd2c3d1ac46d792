"""FLOP/param counts, data files, and the comparison measures of verification."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models.synthetic import conv_net, mlp
from onnxopt.analysis import node_stats, totals
from onnxopt.data import batches, load_npz, synthetic_inputs
from onnxopt.errors import UserError
from onnxopt.verify import compare_arrays, first_divergence


def test_gemm_and_conv_flops():
    stats = {s.name: s for s in node_stats(mlp([10, 20, 3]), {"N": 4})}
    assert stats["fc0"].flops == 2 * 4 * 10 * 20 and stats["fc0"].params == 10 * 20 + 20
    assert stats["fc1"].flops == 2 * 4 * 20 * 3
    conv = node_stats(conv_net([3, 5], size=9, pads=1), {"N": 2})[0]
    assert conv.flops == 2 * 2 * 5 * 9 * 9 * 3 * 9
    assert conv.weight_bytes == 4 * (5 * 3 * 9 + 5)


def test_totals_sum_nodes():
    t = totals(node_stats(mlp([10, 20, 3])))
    assert t["params"] == 10 * 20 + 20 + 20 * 3 + 3


def test_compare_arrays_measures():
    ref = np.array([3.0, 4.0])
    e = compare_arrays("y", ref, np.array([3.0, 4.5]))
    assert e.max_abs == pytest.approx(0.5) and e.rel_l2 == pytest.approx(0.1)
    assert compare_arrays("y", ref, ref).cosine == pytest.approx(1.0)
    assert compare_arrays("y", ref, np.array([1.0])).rel_l2 == float("inf")


def test_first_divergence_finds_changed_node():
    a = mlp([16, 16, 16, 4], seed=0)
    b = mlp([16, 16, 16, 4], seed=0)
    w = b.graph.initializer[2]  # W1: weight of fc1
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(1.1), w.name))
    feeds = synthetic_inputs(a, samples=4)
    d = first_divergence(a, b, feeds, 1e-4)
    assert d is not None and d["node"] == "fc1", d
    assert first_divergence(a, a, feeds, 1e-6) is None


def test_npz_checked_against_model(tmp_path):
    m = mlp([6, 3])
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((5, 6), np.float64))
    feeds = load_npz(good, m)
    assert feeds["x"].dtype == np.float32 and feeds["x"].shape == (5, 6)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.ones((5, 7), np.float32))
    with pytest.raises(UserError, match="axis 1"):
        load_npz(bad, m)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, z=np.ones((5, 6), np.float32))
    with pytest.raises(UserError, match="no array"):
        load_npz(wrong, m)
    junk = tmp_path / "junk.npz"
    junk.write_text("nope")
    with pytest.raises(UserError, match="npz"):
        load_npz(junk, m)


def test_synthetic_inputs_fit_declared_shapes_and_batches():
    m = conv_net([3, 4], size=7, batch=2)  # fixed batch 2
    feeds = synthetic_inputs(m, samples=3)
    assert feeds["x"].shape == (6, 3, 7, 7)
    assert [b["x"].shape[0] for b in batches(m, feeds)] == [2, 2, 2]
    dyn = synthetic_inputs(mlp([5, 2]), samples=4, dims={"N": 9})
    assert dyn["x"].shape == (4, 5)


def test_shapes_flow_through_custom_ops():
    from onnxopt.analysis import tensor_shapes

    m = conv_net([3, 4, 4], size=9)
    m.graph.node[0].op_type = "WinogradConv"
    m.graph.node[0].domain = "onnxopt"
    m.opset_import.append(onnx.helper.make_opsetid("onnxopt", 1))
    shapes = tensor_shapes(m, {"N": 2})
    assert shapes["c0"] == (2, 4, 9, 9) and shapes["y"] == (2, 4, 9, 9)
    assert all(s.flops > 0 for s in node_stats(m, {"N": 2}) if s.op_type in ("Conv", "WinogradConv"))


def test_complete_shapes_reads_what_inference_cannot():
    from onnx import TensorProto, helper

    from onnxopt.verify import complete_shapes

    # Reshape to a shape computed at run time: onnx shape inference cannot know the MatMul's input shape.
    m = mlp([12, 5], use_gemm=False)
    g = m.graph
    g.node[0].input[0] = "r"
    g.node.insert(0, helper.make_node("Shape", ["x"], ["s0"], name="shape"))
    g.node.insert(1, helper.make_node("Abs", ["s0"], ["s"], name="abs"))  # no data propagation through Abs
    g.node.insert(2, helper.make_node("Reshape", ["x", "s"], ["r"], name="reshape"))
    g.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    feeds = synthetic_inputs(m, samples=3)
    assert {s.name: s.flops for s in node_stats(m)}["fc0"] == 0  # inference alone gives up
    stats = {s.name: s for s in node_stats(m, shapes=complete_shapes(m, feeds))}
    assert stats["fc0"].flops == 2 * 1 * 12 * 5
