"""Small synthetic graphs for tests and benchmarks, built with onnx.helper (no weights to download).

Weights are seeded. `spectrum` shapes the singular values of dense weights, s_i = decay**i, so tests can
make layers that a truncated SVD compresses well (decay < 1) or not at all (decay = 1).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def dense_weight(rng: np.random.Generator, k: int, n: int, decay: float = 1.0) -> np.ndarray:
    """A k x n float32 matrix with singular values decay**i (scaled so outputs stay O(1))."""
    q1, _ = np.linalg.qr(rng.standard_normal((k, k)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    r = min(k, n)
    s = decay ** np.arange(r) * np.sqrt(2.0)
    return ((q1[:, :r] * s) @ q2[:r]).astype(np.float32)


def mlp(
    sizes: list[int],
    decay: float = 1.0,
    seed: int = 0,
    use_gemm: bool = True,
    batch: int | str = "N",
    trans_b: bool = False,
) -> onnx.ModelProto:
    """x -> [Gemm|MatMul+Add -> Relu]* -> y with layer widths `sizes`."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i, (k, n) in enumerate(itertools.pairwise(sizes)):
        W = dense_weight(rng, k, n, decay)
        b = (0.1 * rng.standard_normal(n)).astype(np.float32)
        out = f"h{i}" if i < len(sizes) - 2 else "y"
        pre = f"p{i}" if i < len(sizes) - 2 else out
        if use_gemm:
            inits += [
                numpy_helper.from_array(W.T.copy() if trans_b else W, f"W{i}"),
                numpy_helper.from_array(b, f"b{i}"),
            ]
            nodes.append(
                helper.make_node(
                    "Gemm",
                    ["x" if i == 0 else prev, f"W{i}", f"b{i}"],
                    [pre],
                    name=f"fc{i}",
                    transB=int(trans_b),
                )
            )
        else:
            inits += [numpy_helper.from_array(W, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"m{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [pre], name=f"bias{i}"))
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [pre], [out], name=f"relu{i}"))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, sizes[-1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def conv_net(
    channels: list[int],
    size: int = 16,
    kernel: int = 3,
    seed: int = 0,
    pads: int = 1,
    strides: int = 1,
    group: int = 1,
    batch: int | str = "N",
) -> onnx.ModelProto:
    """x -> [Conv(kernel) -> Relu]* -> y, NCHW, with `channels[0]` input channels."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    in_size = size
    for i, (c, m) in enumerate(itertools.pairwise(channels)):
        fan_in = c // group * kernel * kernel
        W = (rng.standard_normal((m, c // group, kernel, kernel)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (0.1 * rng.standard_normal(m)).astype(np.float32)
        inits += [numpy_helper.from_array(W, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(channels) - 2
        out = "y" if last else f"h{i}"
        conv_out = out if last else f"c{i}"
        nodes.append(
            helper.make_node(
                "Conv",
                [prev, f"W{i}", f"b{i}"],
                [conv_out],
                name=f"conv{i}",
                kernel_shape=[kernel, kernel],
                pads=[pads] * 4,
                strides=[strides] * 2,
                group=group,
            )
        )
        if not last:
            nodes.append(helper.make_node("Relu", [conv_out], [out], name=f"relu{i}"))
        prev = out
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels[0], in_size, in_size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, channels[-1], size, size])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
