"""sparse_basis's fits (pure numpy): a filter bank as a sparse combination of a few basis filters.

A Conv with filters A [N, K] (K = C kh kw, each row one filter over the input patch p) computes y = A p + b.
sparse_basis writes A ≈ S D with a basis D [B, K] of B < N filters and sparse coefficients S [N, B]
(Liu et al., Sparse Convolutional Neural Networks, CVPR 2015, without their retraining): the layer runs as a
dense Conv with the B basis filters, then a 1x1 combination S whose nonzeros are the only weights it keeps.

The fit is data-aware: on calibration patches X [n, K] the output error is
    E(S, D) = ||X (A - S D)^T||_F^2 = tr((A - S D) H (A - S D)^T),  H = X^T X / n + d mean(diag) I
(the damping d keeps directions the calibration data never visits). Everything below works on H alone.

1. Basis (weighted SVD): with H = R^T R (R = H^{1/2}), the SVD R A^T = P diag(s) Q^T gives the best rank-B
   D = (R^{-1} P_B)^T, S = Q_B diag(s_B) in E (Eckart-Young in the metric H).
2. Sparse coefficients for a fixed D (sparse regression of the outputs y = A p on the basis outputs z = D
   p): with G = D H D^T [B, B] and F = A H D^T [N, B], E(S) = tr(S G S^T) - 2 <S, F> + tr(A H A^T). Start
   from the dense least squares S* = F G^-1 and keep the `nnz` entries of largest OBS saliency S*_ij^2 /
   (G^-1)_jj (the error of dropping one entry with the rest of its row re-fitted); then re-fit every row
   exactly on its support, S_i,m = F_i,m G_m,m^-1 (least squares on the kept basis outputs). Iterative hard
   thresholding then proposes a new support from the gradient step S + mu (F - S G), mu = 1 / lambda_max(G),
   ranked by the saliency of dropping one entry with the others fixed, T_ij^2 G_jj; a support is kept only
   if its re-fit lowers E, so the error never grows.
3. Basis update (method of optimal directions): for fixed S, min_D E(S, D) = min_D ||R (A^T - D^T S^T)||_F
   is solved by D = (S^T S)^+ S^T A whatever H is (R is invertible and multiplies from the left). Steps 2-3
   alternate (dictionary learning in the metric H) while E decreases, each re-coding starting from the
   previous support where that fits the new basis better than a fresh start. The problem is not convex: on
   banks built as sparse x basis the alternation lowers the error of the masked SVD by about half, without
   always finding the planted structure (tests/passes/test_sparse_basis.py).

The basis rows are rescaled to unit norm in the metric H after every update (S takes the scale), which keeps G
well conditioned and leaves S D unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DAMPING = 0.01  # of the mean diagonal of X^T X / n
IHT_STEPS = 4
MOD_STEPS = 10
RIDGE = 1e-10  # relative to the mean diagonal of G: solves stay defined for a basis output that is all zero


@dataclass
class Fit:
    """A ≈ S D: basis D [B, K], coefficients S [N, B] with `nnz` nonzeros, E / tr(A H A^T) on the fit data."""

    basis: np.ndarray
    coef: np.ndarray
    train_error: float


def metric(X: np.ndarray | None, K: int, damping: float = DAMPING) -> np.ndarray:
    """H = X^T X / n + damping mean(diag) I in float64 (the identity without calibration rows)."""
    if X is None or len(X) == 0:
        return np.eye(K)
    Xd = X.astype(np.float64)
    H = Xd.T @ Xd / len(Xd)
    H[np.diag_indices(K)] += damping * max(float(np.trace(H)) / K, 1e-30)
    return H


@dataclass
class Layer:
    """What every fit of one layer shares: A [N, K] and H in float64, and the SVD of R A^T (module doc, 1)."""

    A: np.ndarray
    H: np.ndarray
    R_inv: np.ndarray
    P: np.ndarray
    s: np.ndarray
    Qt: np.ndarray

    @property
    def total(self) -> float:
        """tr(A H A^T): E of the all-zero approximation, the scale of the relative error."""
        return max(float(np.sum(self.s**2)), 1e-30)


def prepare(A: np.ndarray, H: np.ndarray) -> Layer:
    """The layer's weighted SVD, computed once for all its (B, nnz) fits."""
    lam, E = np.linalg.eigh(H)
    lam = np.maximum(lam, 1e-30 * max(float(lam.max()), 1e-30))
    root = np.sqrt(lam)
    A64 = A.astype(np.float64)
    P, s, Qt = np.linalg.svd(((E * root) @ (E.T @ A64.T)), full_matrices=False)
    return Layer(A64, H, (E / root) @ E.T, P, s, Qt)


def weighted_basis(layer: Layer, B: int) -> tuple[np.ndarray, np.ndarray]:
    """(D [B, K], S [N, B]): the best rank-B factorization A ≈ S D in the metric H."""
    return (layer.R_inv @ layer.P[:, :B]).T, layer.Qt[:B].T * layer.s[:B]


def normal_equations(A: np.ndarray, D: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G = D H D^T, F = A H D^T)."""
    HD = H @ D.T
    return D @ HD, A.astype(np.float64) @ HD


def energy(S: np.ndarray, G: np.ndarray, F: np.ndarray) -> float:
    """E(S) - tr(A H A^T) = tr(S G S^T) - 2 <S, F>."""
    return float(np.sum((S @ G) * S) - 2.0 * np.sum(S * F))


def _ridged(G: np.ndarray) -> np.ndarray:
    return G + np.eye(len(G)) * RIDGE * max(float(np.trace(G)) / len(G), 1e-30)


def refit_support(G: np.ndarray, F: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """S with S_i,m = F_i,m G_m,m^-1 on each row's support m = mask[i] and zeros elsewhere (least squares
    of each output on its kept basis outputs); rows with equal support counts are solved as one batch."""
    Gr = _ridged(G)
    S = np.zeros(mask.shape)
    counts = mask.sum(axis=1)
    for k in np.unique(counts):
        if k == 0:
            continue
        rows = np.flatnonzero(counts == k)
        idx = np.nonzero(mask[rows])[1].reshape(len(rows), k)  # column indices, ascending per row
        sub = Gr[idx[:, :, None], idx[:, None, :]]
        rhs = F[rows[:, None], idx]
        S[rows[:, None], idx] = np.linalg.solve(sub, rhs[:, :, None])[:, :, 0]
    return S


def top_mask(score: np.ndarray, nnz: int) -> np.ndarray:
    """The nnz largest entries of score (ties by position, so the result is deterministic)."""
    flat = score.ravel()
    keep = np.zeros(flat.shape, bool)
    if nnz > 0:
        keep[np.argsort(-flat, kind="stable")[:nnz]] = True
    return keep.reshape(score.shape)


def sparse_code(
    G: np.ndarray, F: np.ndarray, nnz: int, steps: int = IHT_STEPS, warm: np.ndarray | None = None
) -> np.ndarray:
    """S [N, B] with at most nnz nonzeros minimizing tr(S G S^T) - 2 <S, F> (module doc, step 2); `warm`, a
    support to start from instead when it fits better (the previous support, as the basis is updated)."""
    Gr = _ridged(G)
    G_inv = np.linalg.inv(Gr)
    dense = F @ G_inv
    mask = top_mask(dense**2 / np.diag(G_inv), nnz)
    S = refit_support(G, F, mask)
    e = energy(S, G, F)
    if warm is not None:
        S_w = refit_support(G, F, warm)
        e_w = energy(S_w, G, F)
        if e_w < e:
            S, mask, e = S_w, warm, e_w
    mu = 1.0 / max(float(np.linalg.eigvalsh(Gr)[-1]), 1e-30)
    for _ in range(steps):
        T = S + mu * (F - S @ G)
        mask2 = top_mask(T**2 * np.diag(Gr), nnz)
        if np.array_equal(mask2, mask):
            break
        S2 = refit_support(G, F, mask2)
        e2 = energy(S2, G, F)
        if e2 >= e:
            break
        S, mask, e = S2, mask2, e2
    return S


def update_basis(A: np.ndarray, S: np.ndarray) -> np.ndarray:
    """D = (S^T S)^+ S^T A: the best basis for coefficients S in any metric (module doc, step 3)."""
    return np.linalg.lstsq(S, A.astype(np.float64), rcond=None)[0]


def normalise(D: np.ndarray, S: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D, S) with D's rows of unit norm in the metric H and S scaled to keep S D."""
    norms = np.sqrt(np.maximum(np.sum((D @ H) * D, axis=1), 0.0))
    norms = np.where(norms > 1e-30, norms, 1.0)
    return D / norms[:, None], S * norms


def fit(layer: Layer, B: int, nnz: int, steps: int = MOD_STEPS) -> Fit:
    """A [N, K] ≈ S D with B basis filters and nnz coefficients (module doc, steps 1-3)."""
    A, H = layer.A, layer.H
    D, _ = normalise(*weighted_basis(layer, B), H)
    S = sparse_code(*normal_equations(A, D, H), nnz)
    e = energy(S, *normal_equations(A, D, H))
    for _ in range(steps):
        if not np.any(S):
            break
        D2, _ = normalise(update_basis(A, S), S, H)
        S2 = sparse_code(*normal_equations(A, D2, H), nnz, warm=S != 0)
        e2 = energy(S2, *normal_equations(A, D2, H))
        if e2 >= e * (1 - 1e-9):
            break
        D, S, e = D2, S2, e2
    return Fit(
        D.astype(np.float32), S.astype(np.float32), float(np.sqrt(max(layer.total + e, 0.0) / layer.total))
    )


def channel_basis(A: np.ndarray, H: np.ndarray, C: int, q: int) -> np.ndarray:
    """Liu et al.'s intra-channel basis: per input channel c, the q leading kernels of A's columns of that
    channel (its kh kw taps) in the metric of that channel's block of H, as a block-diagonal D [C q, K]
    whose row c q + j is kernel j of channel c (the order of a grouped Conv's outputs, groups = C)."""
    K = A.shape[1]
    taps = K // C
    D = np.zeros((C * q, K))
    for c in range(C):
        cols = slice(c * taps, (c + 1) * taps)
        sub = prepare(A[:, cols], H[cols, cols])
        D_c, _ = weighted_basis(sub, q)
        D[c * q : c * q + len(D_c), cols] = D_c
    return D


def fit_basis(A: np.ndarray, H: np.ndarray, D: np.ndarray, nnz: int) -> Fit:
    """A ≈ S D for a fixed basis D (rows rescaled to unit norm in H) with nnz coefficients (step 2 alone)."""
    A64 = A.astype(np.float64)
    total = max(float(np.sum((A64 @ H) * A64)), 1e-30)
    D, _ = normalise(D, np.zeros((len(A), len(D))), H)
    G, F = normal_equations(A64, D, H)
    S = sparse_code(G, F, nnz)
    e = energy(S, G, F)
    return Fit(D.astype(np.float32), S.astype(np.float32), float(np.sqrt(max(total + e, 0.0) / total)))
