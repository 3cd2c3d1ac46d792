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


def mobilenet_block(
    channels: int = 8,
    expand: int = 3,
    size: int = 12,
    stride: int = 1,
    activation: str = "clip",
    out_channels: int | None = None,
    seed: int = 0,
    batch: int | str = "N",
) -> onnx.ModelProto:
    """MobileNetV2's inverted residual without the residual: x -> 1x1 Conv (channels -> channels * expand) ->
    act -> depthwise 3x3 Conv (group = channels * expand, pads 1, `stride`) -> act -> 1x1 Conv -> y, with act
    Clip(0, 6) ("clip"), Relu ("relu") or nothing ("none")."""
    rng = np.random.default_rng(seed)
    hidden, out_channels = channels * expand, out_channels or channels
    out_size = (size - 1) // stride + 1

    def weight(shape: tuple[int, ...]) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)

    inits = [
        numpy_helper.from_array(weight((hidden, channels, 1, 1)), "W_expand"),
        numpy_helper.from_array(weight((hidden, 1, 3, 3)), "W_dw"),
        numpy_helper.from_array((0.1 * rng.standard_normal(hidden)).astype(np.float32), "b_dw"),
        numpy_helper.from_array(weight((out_channels, hidden, 1, 1)), "W_project"),
        numpy_helper.from_array(np.array(0.0, np.float32), "clip_lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "clip_hi"),
    ]
    nodes = [helper.make_node("Conv", ["x", "W_expand"], ["e"], name="expand", kernel_shape=[1, 1])]

    def act(src: str, dst: str, name: str) -> str:
        if activation == "none":
            return src
        if activation == "relu":
            nodes.append(helper.make_node("Relu", [src], [dst], name=name))
        else:
            nodes.append(helper.make_node("Clip", [src, "clip_lo", "clip_hi"], [dst], name=name))
        return dst

    h = act("e", "e_act", "expand_act")
    nodes.append(
        helper.make_node(
            "Conv",
            [h, "W_dw", "b_dw"],
            ["d"],
            name="depthwise",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[stride, stride],
            group=hidden,
        )
    )
    h = act("d", "d_act", "depthwise_act")
    nodes.append(helper.make_node("Conv", [h, "W_project"], ["y"], name="project", kernel_shape=[1, 1]))
    graph = helper.make_graph(
        nodes,
        "mobilenet_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out_channels, out_size, out_size])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
