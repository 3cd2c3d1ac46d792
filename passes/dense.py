"""What the passes on fully connected layers (lowrank, circulant) share: the checks a Gemm or MatMul must pass
before its weight can be replaced, and its weight and bias read in one orientation.

Both rewrite y = x W + b with W as K x N: for Gemm, y = alpha A B' + beta C with B' = B or B^T (transB), so
W = alpha B' and b = beta C (broadcast along N); for MatMul, W = B and there is no bias. A pointwise Conv
(1x1 kernel, stride 1, no pads, group 1; weight M x C x 1 x 1) is the same map applied at every pixel of an
NCHW input: W = weight[:, :, 0, 0]^T (C x M) and b its bias, on the rows x[n, :, h, w] (see `input_rows`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.rewrite import PassContext, constant_value, new_name, weight_problem


def dense_problem(node: gs.Node, ctx: PassContext) -> str | None:
    """Why a Gemm/MatMul or pointwise Conv (its weight a constant float32) cannot have its weight replaced;
    None if it can."""
    if node.op == "Conv":
        return pointwise_problem(node, ctx)
    shape = tuple(node.inputs[1].shape)
    if len(shape) != 2:
        return f"weight has rank {len(shape)}, not 2"
    if ctx.consumers.get(node.inputs[1].name, 0) > 1:
        return "weight initializer is shared with other nodes"
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return "transA=1 is not supported"
        if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
            return "bias is not constant"
    return None


def pointwise_problem(node: gs.Node, ctx: PassContext) -> str | None:
    """Why a Conv is not a pointwise Conv on a 4-D input with an unshared weight and constant bias."""
    shape = tuple(node.inputs[1].shape)
    if len(shape) != 4 or tuple(shape[2:]) != (1, 1):
        return f"weight shape {list(shape)} is not a 1x1 kernel"
    a = node.attrs
    if a.get("group", 1) != 1:
        return f"group={a['group']}: only group 1 is supported"
    if any(s != 1 for s in a.get("strides", [1, 1])):
        return f"strides={list(a['strides'])}: only stride 1 is supported"
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or any(p != 0 for p in a.get("pads", [0] * 4)):
        return "padded 1x1 convolutions are not supported"
    x = ctx.shapes.get(node.inputs[0].name)
    if x is None or len(x) != 4:
        return "input is not known to be 4-D (NCHW)"
    if ctx.consumers.get(node.inputs[1].name, 0) > 1:
        return "weight initializer is shared with other nodes"
    if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
        return "bias is not constant"
    return None


def input_rows(node: gs.Node, X: np.ndarray, K: int) -> np.ndarray:
    """Calibration values of the node's input as rows of K: NCHW pixels for a pointwise Conv."""
    if node.op == "Conv":
        X = np.moveaxis(X, 1, -1)
    return X.reshape(-1, K)


def dense_layer(node: gs.Node, ctx: PassContext) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(W as K x N, bias [N] or None, calibration rows of the input [n, K] or None): what every pass that
    replaces a dense weight starts from."""
    W = dense_weight(node)
    K, N = W.shape
    X = ctx.activations.get(node.inputs[0].name)
    return W, dense_bias(node, N), input_rows(node, X, K) if X is not None else None


def output_rows(node: gs.Node, ctx: PassContext, N: int) -> int:
    """Rows the layer computes per run (batch 1 where unknown): pixels of a pointwise Conv."""
    shape = ctx.shapes.get(node.outputs[0].name)
    if not shape:
        return 1
    return int(np.prod(shape)) // N


def structured_problem(node: gs.Node, ctx: PassContext, min_dim: int) -> str | None:
    """The checks of the structured-matrix passes (circulant, fastfood, acdc, tensor_train): a constant
    float32 weight that dense_problem accepts, K and N at least min_dim (smaller layers gain nothing worth
    the transform), and a bias that broadcasts along N only."""
    if problem := weight_problem(node) or dense_problem(node, ctx):
        return problem
    K, N = dense_kn(node)
    if min(K, N) < min_dim:
        return f"weight {K}x{N} is too small (K and N must be >= {min_dim})"
    if node.op in ("Gemm", "Conv") and len(node.inputs) > 2 and node.inputs[2].name:
        if np.size(constant_value(node.inputs[2])) not in (1, N):
            return "bias does not broadcast along N only"
    return None


def dense_kn(node: gs.Node) -> tuple[int, int]:
    """(K, N) of W, from the weight's shape and Gemm's transB (a pointwise Conv's M x C x 1 x 1: (C, M))."""
    if node.op == "Conv":
        M, C = (int(d) for d in node.inputs[1].shape[:2])
        return C, M
    rows, cols = (int(d) for d in node.inputs[1].shape)
    return (cols, rows) if node.op == "Gemm" and node.attrs.get("transB", 0) else (rows, cols)


def dense_weight(node: gs.Node) -> np.ndarray:
    """W as K x N with Gemm's alpha folded in."""
    W = constant_value(node.inputs[1]).astype(np.float32, copy=False)
    if node.op == "Conv":
        return np.ascontiguousarray(W[:, :, 0, 0].T)
    if node.op == "Gemm":
        if node.attrs.get("transB", 0):
            W = W.T
        W = W * np.float32(node.attrs.get("alpha", 1.0))
    return W


def dense_bias(node: gs.Node, N: int) -> np.ndarray | None:
    """Gemm's bias times beta (a Conv's bias), broadcast to [N]; None for MatMul or a node without one."""
    if node.op == "MatMul" or len(node.inputs) < 3 or not node.inputs[2].name:
        return None
    b = constant_value(node.inputs[2]).astype(np.float32) * np.float32(node.attrs.get("beta", 1.0))
    return np.broadcast_to(b.reshape(-1) if b.size == N else b, (N,)).astype(np.float32)


def pad_last_axis(x: gs.Tensor, extra: int, rank: int, prefix: str) -> tuple[gs.Tensor, list[gs.Node]]:
    """x zero-padded by `extra` at the end of its last axis (of `rank` axes), and the Pad node that does it
    (none when extra is 0): the zero columns of x meet the zero rows of a weight padded to K + extra."""
    if extra == 0:
        return x, []
    out = gs.Variable(new_name(prefix, "x_padded"), dtype=np.float32)
    pads = np.zeros(2 * rank, np.int64)
    pads[-1] = extra
    node = gs.Node(
        "Pad", new_name(prefix, "pad"), inputs=[x, gs.Constant(new_name(prefix, "pads"), pads)], outputs=[out]
    )
    return out, [node]


def channels_last(node: gs.Node, prefix: str) -> tuple[gs.Tensor, gs.Tensor, list[gs.Node], list[gs.Node]]:
    """(x, y, head, tail) for an emitted chain that computes rows of K -> rows of N: for a pointwise Conv, x
    and y are NHWC tensors, `head` the Transpose from the NCHW input and `tail` the one back to the output;
    for Gemm/MatMul, the node's own input and output and no nodes."""
    x, y = node.inputs[0], node.outputs[0]
    if node.op != "Conv":
        return x, y, [], []
    x_nhwc = gs.Variable(new_name(prefix, "x_nhwc"), dtype=np.float32)
    y_nhwc = gs.Variable(new_name(prefix, "y_nhwc"), dtype=np.float32)
    head = gs.Node("Transpose", new_name(prefix, "to_nhwc"), {"perm": [0, 2, 3, 1]}, [x], [x_nhwc])
    tail = gs.Node("Transpose", new_name(prefix, "to_nchw"), {"perm": [0, 3, 1, 2]}, [y_nhwc], [y])
    return x_nhwc, y_nhwc, [head], [tail]
