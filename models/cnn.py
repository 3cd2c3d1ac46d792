"""Full-size CNN graphs with random weights, for end-to-end speed measurements of the convolution passes.

Speed does not depend on the weights' values, so these models carry He-initialised random weights (batch
norm folded into conv bias, as exporters do). Their layer shapes are those of the real networks:

- `resnet18`: ResNet-18 at 224x224: 7x7/2 stem, max pool, four stages of two basic blocks (3x3 convs of 64,
  128, 256 and 512 channels at 56, 28, 14 and 7), 1x1/2 projections, global average pool, FC 1000.
- `yolo_like`: a YOLOv8n-style detector at 320x320: 3x3/2 downsampling convs, C2f blocks (1x1 conv, split,
  bottlenecks of two 3x3 convs with residuals, concat, 1x1 conv), SiLU activations, an SPPF block, and 3x3
  conv heads at strides 8, 16 and 32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class _Builder:
    """Appends nodes and initializers; names are unique by a running counter."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"{what}{self.count}"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, act: str | None = "relu") -> str:
        name = self.name("conv")
        W = (self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        B = (0.01 * self.rng.standard_normal(cout)).astype(np.float32)
        self.inits += [numpy_helper.from_array(W, f"{name}.W"), numpy_helper.from_array(B, f"{name}.B")]
        p = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.W", f"{name}.B"],
                [f"{name}.y"],
                name=name,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[p, p, p, p],
            )
        )
        return self.act(f"{name}.y", act)

    def act(self, x: str, act: str | None) -> str:
        if act is None:
            return x
        name = self.name(act)
        if act == "relu":
            self.nodes.append(helper.make_node("Relu", [x], [f"{name}.y"], name=name))
        else:  # silu: x * sigmoid(x)
            self.nodes.append(helper.make_node("Sigmoid", [x], [f"{name}.s"], name=f"{name}.sig"))
            self.nodes.append(helper.make_node("Mul", [x, f"{name}.s"], [f"{name}.y"], name=name))
        return f"{name}.y"

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        name = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [f"{name}.y"], name=name, **attrs))
        return f"{name}.y"

    def model(self, x_shape: list[int], outputs: list[str], name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], [], self.inits
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        model.graph.output.extend(inferred[o] for o in outputs)
        onnx.checker.check_model(model)
        return model


def resnet18(size: int = 224, batch: int | str = 1, seed: int = 0) -> onnx.ModelProto:
    """ResNet-18's layer shapes with random weights (see the module docstring)."""
    b = _Builder(seed)
    x = b.conv("x", 3, 64, 7, stride=2)
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            y = b.conv(x, cin, cout, 3, stride)
            y = b.conv(y, cout, cout, 3, act=None)
            short = x if stride == 1 and cin == cout else b.conv(x, cin, cout, 1, stride, act=None)
            x = b.act(b.op("Add", [y, short]), "relu")
            cin = cout
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x], axis=1)
    W = (b.rng.standard_normal((1000, 512)) * np.sqrt(1.0 / 512)).astype(np.float32)
    b.inits += [
        numpy_helper.from_array(W, "fc.W"),
        numpy_helper.from_array(np.zeros(1000, np.float32), "fc.B"),
    ]
    y = b.op("Gemm", [x, "fc.W", "fc.B"], transB=1)
    return b.model([batch, 3, size, size], [y], "resnet18_shaped")


def _c2f(b: _Builder, x: str, cin: int, cout: int, blocks: int, residual: bool = True) -> str:
    half = cout // 2
    y = b.conv(x, cin, cout, 1, act="silu")
    parts = [
        b.op("Slice", [y, *_slice_consts(b, 0, half)]),
        b.op("Slice", [y, *_slice_consts(b, half, cout)]),
    ]
    for _ in range(blocks):
        z = b.conv(parts[-1], half, half, 3, act="silu")
        z = b.conv(z, half, half, 3, act="silu")
        parts.append(b.op("Add", [z, parts[-1]]) if residual else z)
    return b.conv(b.op("Concat", parts, axis=1), half * len(parts), cout, 1, act="silu")


def _slice_consts(b: _Builder, start: int, end: int) -> list[str]:
    names = []
    for what, v in (("start", start), ("end", end), ("axes", 1)):
        name = b.name(f"slice_{what}")
        b.inits.append(numpy_helper.from_array(np.array([v], np.int64), name))
        names.append(name)
    return names


def yolo_like(size: int = 320, batch: int | str = 1, seed: int = 0) -> onnx.ModelProto:
    """A YOLOv8n-shaped detector with random weights (module docstring); outputs at strides 8, 16, 32."""
    b = _Builder(seed)
    x = b.conv("x", 3, 16, 3, stride=2, act="silu")  # /2
    x = b.conv(x, 16, 32, 3, stride=2, act="silu")  # /4
    x = _c2f(b, x, 32, 32, 1)
    x = b.conv(x, 32, 64, 3, stride=2, act="silu")  # /8
    p3 = _c2f(b, x, 64, 64, 2)
    x = b.conv(p3, 64, 128, 3, stride=2, act="silu")  # /16
    p4 = _c2f(b, x, 128, 128, 2)
    x = b.conv(p4, 128, 256, 3, stride=2, act="silu")  # /32
    x = _c2f(b, x, 256, 256, 1)
    y = b.conv(x, 256, 128, 1, act="silu")  # SPPF
    pools = [y]
    for _ in range(3):
        pools.append(b.op("MaxPool", [pools[-1]], kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2]))
    p5 = b.conv(b.op("Concat", pools, axis=1), 512, 256, 1, act="silu")
    outs = []
    for p, c in ((p3, 64), (p4, 128), (p5, 256)):
        h = b.conv(p, c, 64, 3, act="silu")
        h = b.conv(h, 64, 64, 3, act="silu")
        outs.append(b.conv(h, 64, 84, 1, act=None))  # 4 box + 80 class logits per cell
    return b.model([batch, 3, size, size], outs, "yolo_shaped")
