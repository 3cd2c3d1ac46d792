"""filter_prune's numpy side: which filters to keep, and the consumer weights that absorb the removed ones.

Notation: a Conv A has M filters; its channel m reaches the consumer (after per-channel BatchNormalization,
activations and pools) as the activation map y_m. The consumer computes z = sum_m sum_t y_m[t] Wc[m, t] + b,
Wc [M, k, N]: for a Conv consumer t runs over its kh x kw taps (k = kh kw, N its filters), for
Flatten -> Gemm/MatMul over the H x W pixels channel m owns (k = H W, N the outputs).

Keeping the set S (removing R) the consumer sees y_S only. Plain removal keeps Wc[S]. The reconstruction
(Mariet & Sra's "diversity networks" merging, without retraining) fits each removed map as a least-squares
combination of the kept ones plus a constant, y_R ≈ y_S alpha + beta, on calibration positions, and folds
it into the consumer: Wc'[s] = Wc[s] + sum_r alpha[s, r] Wc[r], b' = b + sum_r beta_r sum_t Wc[r, t]. The fit
is exact where y_R is a combination of y_S (redundant filters) and degrades gracefully elsewhere; the
constant is exact where the map is (dead or saturated filters). Near a Conv consumer's zero padding the
constant term is an approximation; the held-out error below includes that.

Selection orders (most important first): `l1` sorts filters by the L1 norm of their weights (Li et al.),
`apoz` by their Average Percentage of Zeros after the ReLU (Hu et al.: mostly-zero filters go first),
`merge` removes greedily the filter whose map is best predicted by the others, weighted by the consumer's use
of it: cost_m = ||Wc[m]||^2 / (G^-1)_mm, G the Gram matrix of [y, 1] over the remaining filters, whose
1 / (G^-1)_mm is the residual of y_m's least-squares fit on the others; G^-1 is downdated after each removal.

Where the consumer's input row is small enough (M k <= PATCH_FIT_MAX) and the calibration rows are at least
twice as many, the reconstruction is instead the least-squares fit of the consumer's output itself over its
input rows p (a Conv's patches or a Gemm's flattened rows, channel-major):
min over W', c of ||p_S W' + c - p Wc|| on calibration patches, solved from the Gram matrix H of [p, 1]:
[W'; c] = (H_SS + lambda I)^-1 H_S: Wc, S the kept channels' columns plus the constant. It is never worse
than plain removal on the fitted rows (Wc[S] is a feasible point) and accounts for the padding. Otherwise
(an FC consumer whose K = M H W inputs outnumber the calibration images, a MatMul that has no bias for the
constant) the channel merge is used where it lowers the output error on the fitted rows, else plain removal.

The estimated error is the relative L2 error of the consumer's output on held-out calibration rows (images
the fit did not see): ||z' - z|| / ||z||.
"""

from __future__ import annotations

import numpy as np

DAMPING = 1e-6  # relative ridge on the Gram matrices: dead filters make them singular
CRITERIA = ("merge", "apoz", "l1")
PATCH_FIT_MAX = 2304  # largest consumer patch (M kh kw) fitted by least squares on patches (a 2304^2 solve)


def gram(Y: np.ndarray) -> np.ndarray:
    """G = [Y, 1]^T [Y, 1] in float64 for rows Y [n, M]; the constant is the last index."""
    Z = np.concatenate([Y.astype(np.float64), np.ones((len(Y), 1))], axis=1)
    return Z.T @ Z


def _ridge(G: np.ndarray) -> float:
    return DAMPING * max(float(np.trace(G)) / len(G), 1e-30)


def l1_order(W: np.ndarray) -> np.ndarray:
    """Filters of W [M, ...] by decreasing L1 norm."""
    return np.argsort(-np.abs(W).reshape(len(W), -1).sum(axis=1), kind="stable")


def apoz_order(A: np.ndarray) -> np.ndarray:
    """Channels of the activations A [n, M, ...] by increasing fraction of zeros (the busiest first)."""
    zeros = (A <= 0).mean(axis=tuple(i for i in range(A.ndim) if i != 1))
    return np.argsort(zeros, kind="stable")


def merge_order(G: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """Filters by greedy backward elimination (see the module doc): the last removed first."""
    M = len(energy)
    inv = np.linalg.inv(G + _ridge(G) * np.eye(M + 1))
    alive = list(range(M + 1))  # positions in `inv`; index M is the constant, never removed
    removed = []
    for _ in range(M - 1):
        diag = np.diag(inv)[:-1]
        cost = energy[alive[:-1]] / np.maximum(diag, 1e-300)
        p = int(np.argmin(cost))
        removed.append(alive.pop(p))
        col = np.delete(inv[:, p], p)
        inv = np.delete(np.delete(inv, p, axis=0), p, axis=1) - np.outer(col, col) / inv[p, p]
    return np.array(alive[:-1] + removed[::-1], dtype=np.int64)


def merge_coefficients(G: np.ndarray, keep: np.ndarray, intercept: bool) -> tuple[np.ndarray, np.ndarray]:
    """(alpha [|S|, |R|], beta [|R|]) of y_R ≈ y_S alpha + beta, from the Gram matrix G of [y, 1]."""
    M = len(G) - 1
    drop = np.setdiff1d(np.arange(M), keep)
    feats = np.concatenate([keep, [M]]) if intercept else keep
    A = G[np.ix_(feats, feats)]
    sol = np.linalg.solve(A + _ridge(A) * np.eye(len(feats)), G[np.ix_(feats, drop)])
    beta = sol[len(keep)] if intercept else np.zeros(len(drop))
    return sol[: len(keep)], beta


def consumer_update(
    Wc: np.ndarray, b: np.ndarray | None, keep: np.ndarray, alpha: np.ndarray | None, beta: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The consumer's weights on the kept channels [|S|, k, N] and its bias (None if it had none and gains
    none); alpha/beta None is plain removal."""
    W = Wc[keep].astype(np.float64)
    if alpha is None:
        return W.astype(np.float32), b
    drop = np.setdiff1d(np.arange(len(Wc)), keep)
    W += np.einsum("sr,rkn->skn", alpha, Wc[drop])
    shift = np.einsum("r,rkn->n", beta, Wc[drop])
    if b is None and not np.any(shift):
        return W.astype(np.float32), None
    return W.astype(np.float32), ((0.0 if b is None else b) + shift).astype(np.float32)


def patch_fit_fits(P: np.ndarray) -> bool:
    """Whether the consumer's output is fitted over its input rows P [n, M k] (else the channel merge): a
    solve of at most PATCH_FIT_MAX unknowns, with at least twice as many rows."""
    return P.shape[1] <= PATCH_FIT_MAX and len(P) >= 2 * (P.shape[1] + 1)


def patch_fit(
    H: np.ndarray, Wc: np.ndarray, b: np.ndarray | None, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The consumer's weights on the kept channels [|S|, k, N] and bias [N] fitted to its own output over
    input patches whose Gram matrix with a constant column is H (see the module doc)."""
    M, k, N = Wc.shape
    idx = feature_index(keep, k)
    feats = np.concatenate([idx, [M * k]])
    A = H[np.ix_(feats, feats)]
    rhs = H[feats, : M * k] @ Wc.reshape(M * k, N).astype(np.float64)
    sol = np.linalg.solve(A + _ridge(A) * np.eye(len(feats)), rhs)
    b_new = (0.0 if b is None else b) + sol[-1]
    return sol[:-1].reshape(len(keep), k, N).astype(np.float32), b_new.astype(np.float32)


def feature_index(keep: np.ndarray, k: int) -> np.ndarray:
    """Columns of the consumer's input rows (channel-major, k per channel) that the kept channels own."""
    return (keep[:, None] * k + np.arange(k)).reshape(-1)


def consumer_output(P: np.ndarray, Wc: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """The consumer's output on its input rows P [n, M k] (float32: an error estimate needs no more)."""
    M, k, N = Wc.shape
    return P.astype(np.float32, copy=False) @ Wc.reshape(M * k, N) + (0.0 if b is None else b)


def consumer_error(
    P: np.ndarray, ref: np.ndarray, keep: np.ndarray, W_new: np.ndarray, b_new: np.ndarray | None
) -> float:
    """Relative L2 error against `ref` (consumer_output of the original) of the consumer's output on rows
    P [n, M k] when it reads the kept channels only, with weights W_new [|S|, k, N] and bias b_new."""
    S, k, N = W_new.shape
    new = P[:, feature_index(keep, k)].astype(np.float32, copy=False) @ W_new.reshape(S * k, N)
    new = new + (0.0 if b_new is None else b_new)
    return float(np.linalg.norm(new - ref) / max(float(np.linalg.norm(ref)), 1e-30))
