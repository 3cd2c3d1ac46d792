"""The dense baseline of the FC benchmarks (circulant, fastfood, acdc): onnxruntime's MatMul on a 4096 x 4096
weight, input named X as in the structured ops' one-node models, so that median_times feeds both alike."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

K = N = 4096


def dense_model(batch: int) -> onnx.ModelProto:
    """Y = X W, X [batch, K], W [K, N] random."""
    W = (np.random.default_rng(0).standard_normal((K, N)) / 64).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "dense",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, N])],
        [numpy_helper.from_array(W, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
