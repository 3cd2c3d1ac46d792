"""Output-aware low-rank fits: weight a dense layer's errors by what the next linear layer makes of them.

A layer y = x W + b (W: K x N) often feeds, through a ReLU, another constant linear layer z = relu(y) W2 + b2
(W2: N x N2) — a classifier's hidden layer and its head. What the model's output sees of an error dY = X dW
is (m . dY) W2, with m the ReLU's 0/1 mask, and when N2 << N most directions of dY never reach z. With

    G = (W2 W2^T) . E[m m^T]        (N x N; Hadamard product, E over calibration rows; m = 1 without a ReLU)

E ||(m . dY) W2||^2 is approximated by tr(dY G dY^T) (the mask's sample-to-sample correlation with dY is
ignored), and the best rank-r W_r in ||X (W - W_r) G^{1/2}||_F is the two-sided weighted SVD

    C = X^T X / n + d mean(eig C) I = S^2,   R = (G + d mean(eig G) I)^{1/2},
    S W R = P diag(s) Q^T,   W_r = (S^{-1} P_r) diag(s_r) (Q_r^T R^{-1}).

Its error by rank is sum_{i>r} s_i^2 ||X S^{-1} p_i||^2 on held-out rows (the q_i are orthonormal), taken
relative to the next layer's output ||relu(X W + b) W2 + b2||: an estimate of the error the model's output
sees, where the one-sided data-aware fit (lowrank.weighted_svd) can only bound the hidden layer's own.
The pass manager still verifies the whole model, so the approximation can cost compression, never the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.dense import dense_bias, dense_weight
from onnxopt.rewrite import constant_value, weight_problem

DAMPING = 0.01  # of the mean eigenvalue, added to the diagonals of X^T X / n and of G
# Ops between the two layers that the weighting can see through: elementwise, and either the identity on
# the values that reach the next layer or a ReLU (whose mask enters G).
_PASS_THROUGH = ("Identity", "Dropout")


@dataclass
class NextLayer:
    """The linear layer z = act(y + add) W2 + b2 that a layer's output y reaches (see next_layer)."""

    W2: np.ndarray  # N x N2
    b2: np.ndarray | None
    relu: bool
    add: np.ndarray | None  # a constant added to y before the activation (MatMul's separate bias Add)


def _single_consumer(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    users = list(tensor.outputs)
    return users[0] if len(users) == 1 and tensor.name not in graph_outputs else None


def _constant_addend(user: gs.Node, tensor: gs.Tensor, N: int) -> np.ndarray | None:
    """The constant that an Add node adds to `tensor`, as [N], or None if it is not a bias along N."""
    other = [t for t in user.inputs if t is not tensor]
    if len(user.inputs) != 2 or len(other) != 1 or not isinstance(other[0], gs.Constant):
        return None
    value = constant_value(other[0])
    if (
        value.dtype != np.float32
        or value.size not in (1, N)
        or (value.ndim and value.shape[-1] != value.size)
    ):
        return None
    return np.broadcast_to(value.reshape(-1), (N,)).astype(np.float32)


def next_layer(node: gs.Node, graph_outputs: set[str], N: int) -> NextLayer | None:
    """The constant float32 Gemm/MatMul that the node's output (N wide) alone reaches through
    Identity/Dropout, constant bias Adds before the ReLU, and at most one ReLU, with no tensor on the way read
    by anything else (another node or the graph's outputs); None otherwise."""
    tensor, relu, add = node.outputs[0], False, None
    while (user := _single_consumer(tensor, graph_outputs)) is not None and user.op in (
        *_PASS_THROUGH,
        "Relu",
        "Add",
    ):
        if len(user.outputs) != 1 or (user.op == "Relu" and relu):
            return None
        if user.op == "Add":
            addend = _constant_addend(user, tensor, N)
            if addend is None or relu:
                return None
            add = addend if add is None else add + addend
        relu = relu or user.op == "Relu"
        tensor = user.outputs[0]
    if user is None or user.op not in ("Gemm", "MatMul") or user.inputs[0] is not tensor:
        return None
    if weight_problem(user) or len(user.inputs[1].shape) != 2:
        return None
    if user.op == "Gemm" and user.attrs.get("transA", 0):
        return None
    W2 = dense_weight(user)
    if W2.shape[0] != N:
        return None
    return NextLayer(W2, dense_bias(user, W2.shape[1]), relu, add)


def _hidden(X: np.ndarray, W: np.ndarray, bias: np.ndarray | None, nxt: NextLayer) -> np.ndarray:
    """X W + bias + the Adds before the activation (float64), the next layer's pre-activation."""
    Y = X.astype(np.float64) @ W.astype(np.float64)
    for b in (bias, nxt.add):
        if b is not None:
            Y += b
    return Y


def _root(M: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """(M_d^{1/2}, M_d^{-1/2}) of the symmetric PSD M_d = M + damping * mean(eig M) * I."""
    lam, E = np.linalg.eigh(M)
    lam = np.maximum(lam, 0.0)
    lam += damping * max(float(lam.mean()), 1e-30)
    return (E * np.sqrt(lam)) @ E.T, (E / np.sqrt(lam)) @ E.T


def output_weight(X: np.ndarray, W: np.ndarray, bias: np.ndarray | None, nxt: NextLayer) -> np.ndarray:
    """G = (W2 W2^T) . E[m m^T] over the rows X (module doc), float64."""
    W2d = nxt.W2.astype(np.float64)
    G = W2d @ W2d.T
    if nxt.relu:
        m = (_hidden(X, W, bias, nxt) > 0).astype(np.float64)
        G *= m.T @ m / len(m)
    return G


def output_aware_svd(
    W: np.ndarray, X: np.ndarray, G: np.ndarray, damping: float = DAMPING
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(L, s, Qt) with W = L diag(s) Qt, truncations optimal in ||X (W - W_r) G^{1/2}||_F, and the SVD's
    orthonormal right vectors (for the error estimate) folded back through R^{-1} in Qt."""
    Xd = X.astype(np.float64)
    S, S_inv = _root(Xd.T @ Xd / len(Xd), damping)
    R, R_inv = _root(G, damping)
    P, s, Qt = np.linalg.svd((S @ W.astype(np.float64) @ R).astype(np.float32), full_matrices=False)
    L = S_inv @ P.astype(np.float64)
    return L.astype(np.float32), s, (Qt.astype(np.float64) @ R_inv).astype(np.float32)


def next_output_norm(X: np.ndarray, W: np.ndarray, bias: np.ndarray | None, nxt: NextLayer) -> float:
    """||act(X W + b + add) W2 + b2||_F: what the next layer's output error is relative to."""
    Y = _hidden(X, W, bias, nxt)
    if nxt.relu:
        Y = np.maximum(Y, 0.0)
    Z = Y @ nxt.W2.astype(np.float64)
    if nxt.b2 is not None:
        Z += nxt.b2
    return float(np.linalg.norm(Z))


def error_by_rank(L: np.ndarray, s: np.ndarray, X_held: np.ndarray, norm: float) -> np.ndarray:
    """err[r] = sqrt(sum_{i>=r} s_i^2 ||X L_i||^2) / norm, r = 0 .. len(s)."""
    energy = s.astype(np.float64) ** 2 * np.sum(
        (X_held.astype(np.float64) @ L.astype(np.float64)) ** 2, axis=0
    )
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    return np.sqrt(np.maximum(tail, 0.0)) / max(norm, 1e-30)
