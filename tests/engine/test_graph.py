"""Model I/O: clear errors on bad files, atomic saves, external data for large models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from models.synthetic import mlp
from onnxopt import graph
from onnxopt.errors import UserError


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        graph.load_model(tmp_path / "nope.onnx")


def test_not_onnx(tmp_path):
    p = tmp_path / "text.onnx"
    p.write_text("this is not a model\n" * 10)
    with pytest.raises(UserError, match="not"):
        graph.load_model(p)


def test_truncated_protobuf(tmp_path):
    p = tmp_path / "cut.onnx"
    data = mlp([32, 32, 4]).SerializeToString()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError):
        graph.load_model(p)


def test_unknown_op_fails_checker():
    m = mlp([8, 4])
    m.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(UserError, match="checker"):
        graph.check_model(m, "m")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    m = mlp([16, 8])
    out = tmp_path / "out.onnx"
    graph.save_model(m, out)
    assert onnx.load(str(out)).SerializeToString() == m.SerializeToString()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_large_model_goes_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 1000)  # stand-in for the 2 GB protobuf limit
    m = mlp([64, 64, 8])
    weights = [onnx.numpy_helper.to_array(t).copy() for t in m.graph.initializer]
    written = graph.save_model(m, tmp_path / "big.onnx")
    assert [p.name for p in written] == ["big.onnx", "big.onnx.data"]
    assert (tmp_path / "big.onnx").stat().st_size < 2000  # the weights went to the side file
    back = graph.load_model(tmp_path / "big.onnx")
    for w, a, b in zip(weights, m.graph.initializer, back.graph.initializer, strict=True):
        # the caller's model stays whole (weights in memory), and the saved one round-trips
        assert a.data_location != onnx.TensorProto.EXTERNAL
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), w)
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(b), w)


def test_name_nodes_makes_names_unique():
    m = mlp([8, 8, 4])
    for n in m.graph.node:
        n.name = ""
    m.graph.node[1].name = "Gemm_0"
    graph.name_nodes(m)
    names = [n.name for n in m.graph.node]
    assert len(set(names)) == len(names) and all(names)


def test_constant_nodes_become_initializers():
    m = mlp([8, 4])
    w = m.graph.initializer[0]
    const = onnx.helper.make_node("Constant", [], [w.name], value=w, name="c")
    del m.graph.initializer[0]
    m.graph.node.insert(0, const)
    assert not graph.is_normalized(m)
    graph.normalize(m)
    assert graph.is_normalized(m) and "Constant" not in [n.op_type for n in m.graph.node]
    assert w.name in {t.name for t in m.graph.initializer}
    onnx.checker.check_model(m)


def test_large_model_sessions_leave_the_proto_untouched(monkeypatch):
    from onnxopt import library
    from onnxopt.data import synthetic_inputs
    from onnxopt.verify import run_model

    m = mlp([64, 128, 10])
    before = m.SerializeToString()
    feeds = synthetic_inputs(m, samples=3)
    small = run_model(m, feeds)["y"]
    monkeypatch.setattr(library, "LARGE_MODEL_BYTES", 1000)  # stand-in for a large model
    large = run_model(m, feeds)["y"]
    np.testing.assert_array_equal(small, large)
    assert m.SerializeToString() == before
