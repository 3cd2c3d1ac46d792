"""Static analysis of a model: tensor shapes, and per node its parameters, weight bytes and FLOPs.

FLOPs count a multiply-add as 2. Conv: 2·N·M·Ho·Wo·(C/g)·kh·kw; Gemm/MatMul: 2·M·K·N (times batch);
WinogradConv F(t x t, 3x3), t = attribute tile (2 or 4), a = t + 2: per t x t output tile a^2 products per
(m, c) plus the input transform (32 adds per tile and input channel for F(2x2), about 144 for F(4x4)) and the
output transform (24 and about 110 per tile and output channel);
DepthwiseConv (3x3, one filter per channel): 2·N·C·Ho·Wo·9, as the Conv group=C it replaces;
FFTConv: per th x tw tile (C' = C sh sw phase channels, kh' = ceil(kh / sh)) one real 2-D FFT per phase
channel and one inverse per output channel, ~2.5 th tw log2(th tw) each, plus the products summed over
channels, 8 per complex multiply-add: 8 M C' th (tw / 2 + 1) per tile (tile size as the reference picks it);
CirculantMatMul (C [K/b, N/b, b]): per row K/b + N/b real FFTs of length b, ~2.5 b log2 b each, plus
8 (K/b)(N/b)(b/2 + 1) for the complex products;
FastfoodMatMul (B [d, n]): per row and block two fast Walsh-Hadamard transforms, n log2 n adds each, plus
3 n for the diagonals: d (2 n log2 n + 3 n);
ACDCMatMul (A [L, n]): per row and layer two DCTs of length n, ~2.5 n log2 n each, plus 2 n for the diagonals.
SparseGemm / SparseConv (values [nnz]): 2 nnz per output row / per output pixel: only the kept weights.
LowBitMatMul (attributes K, N): 2 K N per row, as the dense layer (the codes are unpacked, not skipped).
LowBitConv (attributes C, M, kernel_shape): 2 M C kh kw per output pixel, as the Conv it replaces.
Symbolic dimensions are fixed to concrete values (default 1) for the count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import onnx
from onnx import helper

from onnxopt.graph import skeleton


@dataclass
class NodeStats:
    """What one node costs: its constant parameters, their bytes, and FLOPs at the analysed shapes."""

    name: str
    op_type: str
    params: int
    weight_bytes: int
    flops: int

    def as_dict(self) -> dict:
        return asdict(self)


def input_shapes(model: onnx.ModelProto, dims: dict[str, int] | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of the graph inputs: symbolic or unknown dimensions come from `dims` (default 1)."""
    dims = dims or {}
    inits = {t.name for t in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        shape = []
        for d in t.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            else:
                shape.append(int(dims.get(d.dim_param, dims.get("*", 1))))
        shapes[vi.name] = tuple(shape)
    return shapes


def tensor_shapes(model: onnx.ModelProto, dims: dict[str, int] | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor that shape inference can resolve with the inputs fixed by `dims`."""
    light = skeleton(model)
    concrete = input_shapes(model, dims)
    for vi in light.graph.input:
        if vi.name in concrete:
            for d, v in zip(vi.type.tensor_type.shape.dim, concrete[vi.name], strict=False):
                d.ClearField("dim_param")
                d.dim_value = v
    del light.graph.value_info[:]
    nodes = []
    for node in light.graph.node:
        if node.op_type in SHAPE_TWINS and node.domain not in ("", "ai.onnx"):
            twin = SHAPE_TWINS[node.op_type](node)
            nodes += twin if isinstance(twin, list) else [twin]
        else:
            nodes.append(node)
    del light.graph.node[:]
    light.graph.node.extend(nodes)
    for vi in light.graph.output:  # declared symbolic output dims would mask the inferred concrete ones
        vi.type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[vi.name] = tuple(d.dim_value for d in t.shape.dim)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes as a plain dict."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# A FLOP rule takes (input names, output names, attributes, shapes) so that it serves onnx protos and
# graphsurgeon nodes alike.
def _conv_flops(inputs, outputs, attrs, shapes) -> int:
    # Weights are [M, C/g, kh, kw]: each output element meets w[1]·kh·kw weights.
    w, y = shapes.get(inputs[1]), shapes.get(outputs[0])
    return 2 * math.prod(y) * math.prod(w[1:]) if w and y else 0


def _conv_transpose_flops(inputs, outputs, attrs, shapes) -> int:
    # Weights are [C, M/g, kh, kw]: each input element meets w[1]·kh·kw weights.
    x, w = shapes.get(inputs[0]), shapes.get(inputs[1])
    return 2 * math.prod(x) * math.prod(w[1:]) if w and x else 0


def _gemm_flops(inputs, outputs, attrs, shapes) -> int:
    a, y = shapes.get(inputs[0]), shapes.get(outputs[0])
    if not a or not y:
        return 0
    k = a[0] if attrs.get("transA", 0) else a[-1]
    return 2 * math.prod(y) * k


def _matmul_flops(inputs, outputs, attrs, shapes) -> int:
    a, y = shapes.get(inputs[0]), shapes.get(outputs[0])
    if not a or not y:
        return 0
    return 2 * math.prod(y) * a[-1]


def _winograd_flops(inputs, outputs, attrs, shapes) -> int:
    x, w, y = (shapes.get(n) for n in (inputs[0], inputs[1], outputs[0]))
    if not x or not w or not y:
        return 0
    n, c = x[0], x[1]
    m = w[0]
    t = int(attrs.get("tile", 2))
    tiles = n * math.ceil(y[2] / t) * math.ceil(y[3] / t)
    in_cost, out_cost = (144, 110) if t == 4 else (32, 24)
    return tiles * (2 * (t + 2) ** 2 * m * c + in_cost * c + out_cost * m)


def _depthwise_flops(inputs, outputs, attrs, shapes) -> int:
    # W is [C, 1, 3, 3]: each output element meets 9 weights, as in the Conv group=C it stands for.
    return _conv_flops(inputs, outputs, attrs, shapes)


def _fftconv_flops(inputs, outputs, attrs, shapes) -> int:
    from onnxopt.reference.fftconv import default_tile

    x, w, y = (shapes.get(n) for n in (inputs[0], inputs[1], outputs[0]))
    if not x or not w or not y:
        return 0
    sh, sw = attrs.get("strides", [1, 1])
    n, m, c = x[0], w[0], w[1] * sh * sw
    kh, kw = -(-w[2] // sh), -(-w[3] // sw)
    th, tw = default_tile(kh, y[2]), max(2, default_tile(kw, y[3]))
    tiles = n * math.ceil(y[2] / (th - kh + 1)) * math.ceil(y[3] / (tw - kw + 1))
    fft = 2.5 * th * tw * math.log2(th * tw)
    return int(tiles * ((c + m) * fft + 8 * m * c * th * (tw // 2 + 1)))


def _circulant_flops(inputs, outputs, attrs, shapes) -> int:
    c, y = shapes.get(inputs[1]), shapes.get(outputs[0])
    if not c or not y:
        return 0
    kb, nb, b = c
    rows = math.prod(y[:-1])
    fft = 2.5 * b * math.log2(b)
    return int(rows * ((kb + nb) * fft + 8 * kb * nb * (b // 2 + 1)))


def _fastfood_flops(inputs, outputs, attrs, shapes) -> int:
    b, y = shapes.get(inputs[1]), shapes.get(outputs[0])
    if not b or not y:
        return 0
    d, n = b
    return int(math.prod(y[:-1]) * d * (2 * n * math.log2(n) + 3 * n))


def _acdc_flops(inputs, outputs, attrs, shapes) -> int:
    a, y = shapes.get(inputs[1]), shapes.get(outputs[0])
    if not a or not y:
        return 0
    layers, n = a
    return int(math.prod(y[:-1]) * layers * (5 * n * math.log2(n) + 2 * n))


def _sparse_gemm_flops(inputs, outputs, attrs, shapes) -> int:
    v, y = shapes.get(inputs[1]), shapes.get(outputs[0])
    return 2 * math.prod(y[:-1]) * v[0] if v and y else 0


def _sparse_conv_flops(inputs, outputs, attrs, shapes) -> int:
    v, y = shapes.get(inputs[1]), shapes.get(outputs[0])
    return 2 * y[0] * math.prod(y[2:]) * v[0] if v and y else 0


def _lowbit_conv_flops(inputs, outputs, attrs, shapes) -> int:
    y = shapes.get(outputs[0])
    k = math.prod(int(v) for v in attrs.get("kernel_shape", (1, 1)))
    return 2 * y[0] * math.prod(y[2:]) * int(attrs.get("M", 0)) * int(attrs.get("C", 0)) * k if y else 0


def _lowbit_flops(inputs, outputs, attrs, shapes) -> int:
    y = shapes.get(outputs[0])
    return 2 * math.prod(y[:-1]) * int(attrs.get("K", 0)) * int(attrs.get("N", 0)) if y else 0


FLOP_RULES: dict[str, Callable] = {
    "Conv": _conv_flops,
    "ConvTranspose": _conv_transpose_flops,
    "Gemm": _gemm_flops,
    "MatMul": _matmul_flops,
    "WinogradConv": _winograd_flops,
    "DepthwiseConv": _depthwise_flops,
    "FFTConv": _fftconv_flops,
    "CirculantMatMul": _circulant_flops,
    "FastfoodMatMul": _fastfood_flops,
    "ACDCMatMul": _acdc_flops,
    "SparseGemm": _sparse_gemm_flops,
    "SparseConv": _sparse_conv_flops,
    "LowBitMatMul": _lowbit_flops,
    "LowBitConv": _lowbit_conv_flops,
}


def _conv_twin(node: onnx.NodeProto, **fixed) -> onnx.NodeProto:
    """The standard Conv of equal output shape as a custom conv node: its pads, strides and group, plus
    `fixed` attributes (the kernel shape where the op implies it)."""
    a = attributes(node)
    kept = {k: a[k] for k in ("pads", "strides", "group") if k in a}
    return helper.make_node("Conv", list(node.input), list(node.output), name=node.name, **kept, **fixed)


def _circulant_twin(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """CirculantMatMul(X, C, S[, B]) -> Y [..., N] with N = (N/b) b, read from C [K/b, N/b, b]. No single
    standard op merges C's last two axes into Y's, so the twin is a small chain that data propagation
    resolves: Einsum gives [..., N/b, b], and a Reshape to Shape(X)[:-1] + [-1] merges the two."""
    x, c, y = node.input[0], node.input[1], node.output[0]
    t = f"{y}__twin"
    const = helper.make_tensor
    return [
        helper.make_node("Einsum", [x, c], [t + "_blocks"], equation="...k,ijb->...jb"),
        helper.make_node("Shape", [x], [t + "_xshape"], end=-1),
        helper.make_node(
            "Constant", [], [t + "_minus1"], value=const(t + "_m1", onnx.TensorProto.INT64, [1], [-1])
        ),
        helper.make_node("Concat", [t + "_xshape", t + "_minus1"], [t + "_shape"], axis=0),
        helper.make_node("Reshape", [t + "_blocks", t + "_shape"], [y], name=node.name),
    ]


def _fastfood_twin(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """FastfoodMatMul(X, ...) -> Y [..., N], N the attribute out_features: ConstantOfShape of
    Shape(X)[:-1] + [N], which data propagation resolves (no weight-sized constant in the skeleton)."""
    x, y = node.input[0], node.output[0]
    t = f"{y}__twin"
    N = int(attributes(node).get("out_features", 0))
    const = helper.make_tensor
    return [
        helper.make_node("Shape", [x], [t + "_xshape"], end=-1),
        helper.make_node(
            "Constant", [], [t + "_n"], value=const(t + "_nv", onnx.TensorProto.INT64, [1], [N])
        ),
        helper.make_node("Concat", [t + "_xshape", t + "_n"], [t + "_shape"], axis=0),
        helper.make_node(
            "ConstantOfShape",
            [t + "_shape"],
            [y],
            name=node.name,
            value=const(t + "_zero", onnx.TensorProto.FLOAT, [1], [0.0]),
        ),
    ]


def _lowbit_twin(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """LowBitMatMul(X, Q, S, Z[, B]) -> Y [..., N], N the attribute: the fastfood twin's chain with N."""
    renamed = onnx.NodeProto()
    renamed.CopyFrom(node)
    for a in renamed.attribute:
        if a.name == "N":
            a.name = "out_features"
    return _fastfood_twin(renamed)


def _acdc_twin(node: onnx.NodeProto) -> onnx.NodeProto:
    """ACDCMatMul(X, A, D[, P[, B]]) -> Y [..., N]: N is B's length when B is given (Einsum over X's last
    axis with B gives exactly [..., N]), else n, X's own last dimension (Identity)."""
    x, y = node.input[0], node.output[0]
    if len(node.input) > 4 and node.input[4]:
        return helper.make_node("Einsum", [x, node.input[4]], [y], name=node.name, equation="...k,j->...j")
    return helper.make_node("Identity", [x], [y], name=node.name)


def _csr_rows(node: onnx.NodeProto, t: str) -> list[onnx.NodeProto]:
    """Nodes computing [R] = Shape(row_ptr) - 1 (the CSR's row count) into t + "_rows"."""
    one = helper.make_tensor(t + "_one", onnx.TensorProto.INT64, [1], [1])
    return [
        helper.make_node("Shape", [node.input[3]], [t + "_ptr"]),
        helper.make_node("Constant", [], [t + "_1"], value=one),
        helper.make_node("Sub", [t + "_ptr", t + "_1"], [t + "_rows"]),
    ]


def _sparse_gemm_twin(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """SparseGemm(X, values, indices, row_ptr[, bias]) -> Y [..., N], N = len(row_ptr) - 1: ConstantOfShape
    of Shape(X)[:-1] + [N], which data propagation resolves."""
    x, y = node.input[0], node.output[0]
    t = f"{y}__twin"
    zero = helper.make_tensor(t + "_zero", onnx.TensorProto.FLOAT, [1], [0.0])
    return [
        *_csr_rows(node, t),
        helper.make_node("Shape", [x], [t + "_xshape"], end=-1),
        helper.make_node("Concat", [t + "_xshape", t + "_rows"], [t + "_shape"], axis=0),
        helper.make_node("ConstantOfShape", [t + "_shape"], [y], name=node.name, value=zero),
    ]


def _sparse_conv_twin(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """SparseConv(X, values, indices, row_ptr[, bias]) -> the Conv of its attributes with a stand-in weight
    [M, C, kh, kw] (M = len(row_ptr) - 1) made by ConstantOfShape, which data propagation resolves."""
    a = attributes(node)
    t = f"{node.output[0]}__twin"
    kh, kw = (int(k) for k in a.get("kernel_shape", (1, 1)))
    rest = helper.make_tensor(t + "_ckk", onnx.TensorProto.INT64, [3], [int(a.get("C", 1)), kh, kw])
    zero = helper.make_tensor(t + "_zero", onnx.TensorProto.FLOAT, [1], [0.0])
    kept = {k: a[k] for k in ("pads", "strides", "dilations", "kernel_shape") if k in a}
    return [
        *_csr_rows(node, t),
        helper.make_node("Constant", [], [t + "_rest"], value=rest),
        helper.make_node("Concat", [t + "_rows", t + "_rest"], [t + "_wshape"], axis=0),
        helper.make_node("ConstantOfShape", [t + "_wshape"], [t + "_w"], value=zero),
        helper.make_node("Conv", [node.input[0], t + "_w"], list(node.output), name=node.name, **kept),
    ]


def _lowbit_conv_twin(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """LowBitConv(X, Q, S, Z[, B]) -> the Conv of its attributes with a constant stand-in weight
    [M, C, kh, kw] (its shape is all the attributes give; the values never matter to shapes)."""
    a = attributes(node)
    t = f"{node.output[0]}__twin"
    kh, kw = (int(k) for k in a.get("kernel_shape", (1, 1)))
    shape = [int(a.get("M", 1)), int(a.get("C", 1)), kh, kw]
    wshape = helper.make_tensor(t + "_shape", onnx.TensorProto.INT64, [4], shape)
    zero = helper.make_tensor(t + "_zero", onnx.TensorProto.FLOAT, [1], [0.0])
    kept = {k: a[k] for k in ("pads", "strides", "dilations", "kernel_shape") if k in a}
    return [
        helper.make_node("Constant", [], [t + "_wshape"], value=wshape),
        helper.make_node("ConstantOfShape", [t + "_wshape"], [t + "_w"], value=zero),
        helper.make_node("Conv", [node.input[0], t + "_w"], list(node.output), name=node.name, **kept),
    ]


# onnx's shape inference knows no custom op: for shapes only, each is read as a standard op of equal shape
# (or, where no single op has it, a short chain of them ending in the custom node's output: CirculantMatMul).
# DepthwiseConv carries group=C (onnx's Conv inference reads only the output channels from W, so a node
# without it would still get its shape; a fused activation keeps the shape); FFTConv's kernel shape is W's.
SHAPE_TWINS: dict[str, Callable[[onnx.NodeProto], onnx.NodeProto | list[onnx.NodeProto]]] = {
    "WinogradConv": lambda n: _conv_twin(n, kernel_shape=[3, 3]),
    "DepthwiseConv": lambda n: _conv_twin(n, kernel_shape=[3, 3]),
    "FFTConv": _conv_twin,
    "CirculantMatMul": _circulant_twin,
    "FastfoodMatMul": _fastfood_twin,
    "ACDCMatMul": _acdc_twin,
    "SparseGemm": _sparse_gemm_twin,
    "SparseConv": _sparse_conv_twin,
    "LowBitMatMul": _lowbit_twin,
    "LowBitConv": _lowbit_conv_twin,
}


def unresolved(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Tensors that a FLOP rule needs and shape inference left unknown."""
    names = {
        t for n in model.graph.node if n.op_type in FLOP_RULES for t in [*n.input[:2], *n.output[:1]] if t
    }
    return sorted(t for t in names if t not in shapes)


def node_stats(
    model: onnx.ModelProto,
    dims: dict[str, int] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> list[NodeStats]:
    """Per node: op, constant parameter count, weight bytes, FLOPs (0 for ops without a rule). `shapes`
    (e.g. from `verify.complete_shapes`) replaces shape inference."""
    shapes = shapes if shapes is not None else tensor_shapes(model, dims)
    inits = {t.name: t for t in model.graph.initializer}
    counted: set[str] = set()
    stats = []
    for node in model.graph.node:
        params = nbytes = 0
        for name in node.input:
            if name in inits and name not in counted:
                counted.add(name)  # a shared initializer is counted once, at its first user
                t = inits[name]
                numel = math.prod(t.dims)
                params += numel
                nbytes += numel * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        rule = FLOP_RULES.get(node.op_type)
        flops = int(rule(node.input, node.output, attributes(node), shapes)) if rule else 0
        stats.append(NodeStats(node.name, node.op_type, params, nbytes, flops))
    return stats


def totals(stats: list[NodeStats]) -> dict[str, int]:
    """Model totals of a node_stats list."""
    return {
        "nodes": len(stats),
        "params": sum(s.params for s in stats),
        "weight_bytes": sum(s.weight_bytes for s in stats),
        "flops": sum(s.flops for s in stats),
    }
