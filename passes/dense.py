"""What the passes on fully connected layers (lowrank, circulant) share: the checks a Gemm or MatMul must pass
before its weight can be replaced, and its weight and bias read in one orientation.

Both rewrite y = x W + b with W as K x N: for Gemm, y = alpha A B' + beta C with B' = B or B^T (transB), so
W = alpha B' and b = beta C (broadcast along N); for MatMul, W = B and there is no bias.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.rewrite import PassContext, constant_value, new_name, weight_problem


def dense_problem(node: gs.Node, ctx: PassContext) -> str | None:
    """Why a Gemm/MatMul (its weight a constant float32) cannot have its weight replaced; None if it can."""
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


def structured_problem(node: gs.Node, ctx: PassContext, min_dim: int) -> str | None:
    """The checks of the structured-matrix passes (circulant, fastfood, acdc, tensor_train): a constant
    float32 weight that dense_problem accepts, K and N at least min_dim (smaller layers gain nothing worth
    the transform), and a bias that broadcasts along N only."""
    if problem := weight_problem(node) or dense_problem(node, ctx):
        return problem
    K, N = dense_kn(node)
    if min(K, N) < min_dim:
        return f"weight {K}x{N} is too small (K and N must be >= {min_dim})"
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
        if np.size(constant_value(node.inputs[2])) not in (1, N):
            return "bias does not broadcast along N only"
    return None


def dense_kn(node: gs.Node) -> tuple[int, int]:
    """(K, N) of W, from the weight's shape and Gemm's transB."""
    rows, cols = (int(d) for d in node.inputs[1].shape)
    return (cols, rows) if node.op == "Gemm" and node.attrs.get("transB", 0) else (rows, cols)


def dense_weight(node: gs.Node) -> np.ndarray:
    """W as K x N with Gemm's alpha folded in."""
    W = constant_value(node.inputs[1]).astype(np.float32, copy=False)
    if node.op == "Gemm":
        if node.attrs.get("transB", 0):
            W = W.T
        W = W * np.float32(node.attrs.get("alpha", 1.0))
    return W


def dense_bias(node: gs.Node, N: int) -> np.ndarray | None:
    """Gemm's bias times beta, broadcast to [N]; None for MatMul or a Gemm without one."""
    if node.op != "Gemm" or len(node.inputs) < 3 or not node.inputs[2].name:
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
