"""filter_prune's graph propagation: where the output channels of a Conv go, and what must shrink with them.

Removing output channels S' of a Conv A (keeping S) changes every tensor indexed by A's channel until a layer
mixes channels: A's own filters and bias, a BatchNormalization's scale, B, mean and var (sliced to S),
channel-wise elementwise activations and pools (nothing to change: channel c of their output depends on
channel c of their input only), then the consumer, whose input channels fall: a group-1 Conv (its weight
[N, C, kh, kw] loses the columns C not in S), or Flatten(axis=1) -> Gemm/MatMul, where channel c of an NCHW
tensor of H x W pixels owns the H W consecutive rows c H W .. (c + 1) H W - 1 of the weight (K x N).

`follow` walks that path and returns it as a Chain, or the reason it cannot be followed: a tensor read by
several nodes or a graph output (every reader would need the channels removed, or an output would change
shape), a residual Add or a Concat (the other operand would have to drop the same channels), a Reshape
other than Flatten(axis=1), or any op not known to be channel-wise. Nothing outside the chain changes.
The Convs declined here for a join, a Concat or several readers are pruned as channel groups instead
(filter_group.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

# Ops whose output channel c depends on input channel c alone (and whose other inputs, if any, are scalars).
CHANNEL_WISE = {
    "Relu",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "Softplus",
    "Clip",
    "Identity",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
}
BN_PARAMS = 4  # scale, B, mean, var


@dataclass(frozen=True)
class Chain:
    """The path from a Conv's output to the layer that mixes its channels."""

    between: tuple[str, ...]  # names of the nodes in between (BatchNormalization, activations, pools)
    batchnorms: tuple[str, ...]  # the BatchNormalization nodes among them (their parameters are sliced)
    consumer: str  # the Conv, Gemm or MatMul whose input channels fall
    consumer_op: str
    consumer_input: str  # the 4-D NCHW tensor the consumer reads (before Flatten for Gemm/MatMul)
    relu_output: str | None  # the first Relu's output: where the fraction of zeros is counted (Hu et al.)
    tensors: tuple[str, ...]  # the variables whose channel count changes (their stored shapes are dropped)


def _readers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.outputs)


def _weight_ok(node: gs.Node, ndim: int, consumers: dict[str, int]) -> str | None:
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return "its weight is not a constant initializer"
    w = node.inputs[1]
    if np.dtype(w.dtype) != np.float32:
        return f"its weight dtype {np.dtype(w.dtype)} is not float32"
    if len(w.shape) != ndim:
        return f"its weight has rank {len(w.shape)}, not {ndim}"
    if consumers.get(w.name, 0) > 1:
        return "its weight is shared with other nodes"
    if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
        return "its bias is not constant"
    return None


def _conv_consumer_problem(node: gs.Node, consumers: dict[str, int]) -> str | None:
    if node.attrs.get("group", 1) != 1:
        return f"group={node.attrs['group']}"
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"auto_pad={node.attrs['auto_pad']}"
    return _weight_ok(node, 4, consumers)


def _dense_consumer_problem(node: gs.Node, consumers: dict[str, int]) -> str | None:
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "transA=1"
    if problem := _weight_ok(node, 2, consumers):
        return problem
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
        N = int(node.inputs[1].shape[0] if node.attrs.get("transB", 0) else node.inputs[1].shape[1])
        if int(np.prod(node.inputs[2].shape)) not in (1, N):
            return "its bias does not broadcast along N only"
    return None


def _blocked(t: gs.Tensor, graph_outputs: set[str]) -> str | None:
    """Why the channels of `t` cannot be followed past it: a graph output, or not exactly one reader."""
    if t.name in graph_outputs:
        return f"{t.name} is a graph output (its shape would change)"
    readers = _readers(t)
    if len(readers) != 1:
        ops = ", ".join(f"{n.op} {n.name}" for n in readers) or "nothing"
        return f"{t.name} feeds {len(readers)} nodes ({ops}): the propagation cannot follow several readers"
    if readers[0].inputs[0] is not t:
        return f"{t.name} is not the data input of {readers[0].op} {readers[0].name}"
    return None


def _unfollowable(node: gs.Node) -> str:
    if node.op in ("Add", "Sum", "Sub", "Mul", "Div"):
        return (
            f"feeds {node.op} {node.name} (a join of two branches, e.g. a residual): both operands would "
            "have to drop the same channels, which is not supported"
        )
    if node.op == "Concat":
        return f"feeds Concat {node.name}: the channels would have to be removed from the concatenation"
    if node.op in ("Reshape", "Flatten"):
        return f"feeds {node.op} {node.name}: only Flatten(axis=1) into Gemm/MatMul is followed"
    return f"feeds {node.op} {node.name}, which the propagation does not know to be channel-wise"


def follow(conv: gs.Node, graph: gs.Graph, consumers: dict[str, int]) -> Chain | str:
    """The Chain from `conv`'s output to the consumer that mixes its channels, or why there is none."""
    outputs = {t.name for t in graph.outputs}
    t = conv.outputs[0]
    between: list[str] = []
    batchnorms: list[str] = []
    tensors = [t.name]
    relu = None
    while True:
        if problem := _blocked(t, outputs):
            return problem
        node = _readers(t)[0]
        if node.op == "BatchNormalization":
            params = node.inputs[1 : 1 + BN_PARAMS]
            if len(params) != BN_PARAMS or not all(isinstance(p, gs.Constant) for p in params):
                return f"BatchNormalization {node.name} has non-constant parameters"
            batchnorms.append(node.name)
        elif node.op in CHANNEL_WISE:
            if any(o.name for o in node.outputs[1:]):
                return f"{node.op} {node.name} has a second output (indices), which is not followed"
            if node.op == "Relu" and relu is None:
                relu = node.outputs[0].name
        elif node.op == "Conv":
            if problem := _conv_consumer_problem(node, consumers):
                return f"the consumer Conv {node.name} cannot lose input channels: {problem}"
            return Chain(tuple(between), tuple(batchnorms), node.name, "Conv", t.name, relu, tuple(tensors))
        elif node.op == "Flatten" and node.attrs.get("axis", 1) == 1:
            flat = node.outputs[0]
            if problem := _blocked(flat, outputs):
                return problem
            dense = _readers(flat)[0]
            if dense.op not in ("Gemm", "MatMul"):
                return f"Flatten {node.name} feeds {dense.op} {dense.name}, not Gemm/MatMul"
            if problem := _dense_consumer_problem(dense, consumers):
                return f"the consumer {dense.op} {dense.name} cannot lose input rows: {problem}"
            between.append(node.name)
            tensors.append(flat.name)
            return Chain(
                tuple(between), tuple(batchnorms), dense.name, dense.op, t.name, relu, tuple(tensors)
            )
        else:
            return _unfollowable(node)
        between.append(node.name)
        t = node.outputs[0]
        tensors.append(t.name)
