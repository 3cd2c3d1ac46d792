"""prune, the numpy half: masks, layer-wise reconstruction, prune-and-restore, error estimates and CSR.

Every layer is y = x W + b with W as K x N (inputs k, outputs n); a Conv is its im2col form, W = A^T with A
the weight reshaped to M x (C kh kw), so one set of functions serves Gemm, MatMul and Conv.

Saliency (the cost of removing weight w_kn). Magnitude (Han et al.): w_kn^2. With calibration rows X of the
layer's input, OBS (Hassibi & Stork; SparseGPT's form): w_kn^2 / [H^-1]_kk with H = X^T X / n + d I, the
damping d = DAMPING * mean(diag X^T X / n) (directions the calibration rows never visit keep a cost). The
layer's error is sum_n (w_n - w'_n)^T H (w_n - w'_n): ||X (W - W')||_F^2 / n plus d ||W - W'||_F^2, a ridge
toward the trained weights that keeps a fit on few rows from memorising them.

Patterns, in the coordinates of W^T (row n = one output, the rows a sparse kernel streams):
unstructured (layer-wide threshold on the saliency); N:M (in every group of M consecutive k of one output,
the N most salient survive: sparsity 1 - N/M); RxC blocks (R consecutive outputs x C consecutive k, scored
by their summed saliency, the most salient blocks survive).

Reconstruction (exact): with the mask fixed, each output column n is an independent least squares on its
support S (kept weights) with pruned set P:  min_{w'_P = 0} (w - w')^T H (w - w').  Two closed forms of the
same solution; the smaller system is solved:
    support form   H_SS w'_S = (H w)_S                                          (|S| unknowns)
    pruned form    w' = w - [H^-1]_{:P} ([H^-1]_PP)^-1 w_P                      (|P| unknowns, OBS)
so the cost per column is min(|S|, |P|)^3, largest at 50% sparsity; columns are sorted by that size and
solved in batches (LAPACK, float64): ~1 s for a 1024 x 1024 layer at 80% sparsity. SparseGPT's update
(inputs k in order, each pruned weight's OBS correction applied to the inputs after it, through the Cholesky
factor of H^-1) costs O(K^2 N) for every mask but only approximates this optimum, since an input it has
passed is never revisited (Fashion-MNIST's fc1 at 80%, held-out error: masked 0.30, sequential 0.16, exact
0.06); it takes over only where the exact solve would cost more than MAX_EXACT_REFIT (layers of a few
thousand inputs and outputs near 50% sparsity).

Prune-and-restore (Gao et al.): after a re-fit, the mask is chosen again from the refitted weights, pruned
ones included: a kept weight scores its removal cost w'_k^2 / [H^-1]_kk, a pruned weight the error its
return alone would remove, g_k^2 / H_kk with g = H (w - w') (both in units of the layer's error). The new
mask is re-fitted and kept only if the error on the fit rows fell; RESTORE_STEPS rounds at most.

Error estimates are measured on held-out calibration rows (every other row; the fit sees the rest):
||X (W - W')||_F / ||X W + b||_F, like lowrank; without rows, ||W - W'||_F / ||W||_F.

to_csr: the CSR of W^T (N rows of K columns) that SparseGemm/SparseConv take: float32 values, int32 column
indices (ascending within a row), int64 row pointers of length N + 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from onnxopt.reference.prune import to_csr as reference_csr

DAMPING = 0.1  # of the mean diagonal of X^T X / n (measured best of 0.01, 0.1, 1 on few rows)
RESTORE_STEPS = 2
# Above this many multiply-adds per re-fit (seconds here) the exact solve gives way to the sequential one.
MAX_EXACT_REFIT = 2e11
BATCH_ELEMENTS = 1 << 23  # float64 elements per batch of gathered systems (64 MiB)


# ------------------------------------------------------------------------------------------------ patterns


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: unstructured; nm (keep n of every m consecutive k of one output); block (n outputs
    by m consecutive k)."""

    kind: str
    n: int = 1
    m: int = 1

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (None for the others, whose sparsity is free)."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        return {"unstructured": "unstructured", "nm": f"{self.n}:{self.m}"}.get(
            self.kind, f"{self.n}x{self.m}"
        )


def parse_pattern(text: str) -> Pattern:
    """'unstructured', 'N:M' (e.g. 2:4, 1:4) or 'RxC' blocks (e.g. 1x4, 4x4); ValueError otherwise."""
    text = text.strip().lower()
    if text in ("", "unstructured", "none"):
        return Pattern("unstructured")
    if m := re.fullmatch(r"(\d+):(\d+)", text):
        n, mm = int(m[1]), int(m[2])
        if not 1 <= n < mm:
            raise ValueError(f"pattern {text}: N:M needs 1 <= N < M")
        return Pattern("nm", n, mm)
    if m := re.fullmatch(r"(\d+)x(\d+)", text):
        r, c = int(m[1]), int(m[2])
        if r < 1 or c < 1 or r * c < 2:
            raise ValueError(f"pattern {text}: blocks need R, C >= 1 and R*C >= 2")
        return Pattern("block", r, c)
    raise ValueError(f"pattern {text!r} is not understood: unstructured, N:M (e.g. 2:4) or RxC (e.g. 1x4)")


def pattern_problem(pattern: Pattern, K: int, N: int) -> str | None:
    """Why `pattern` cannot tile a K x N weight (K inputs, N outputs); None if it can."""
    if pattern.kind == "nm" and K % pattern.m:
        return f"pattern {pattern}: K={K} inputs are not a multiple of M={pattern.m}"
    if pattern.kind == "block" and (N % pattern.n or K % pattern.m):
        return (
            f"pattern {pattern}: a {K}x{N} weight (K x N) is not tiled by {pattern.n} outputs x {pattern.m} k"
        )
    return None


# ------------------------------------------------------------------------------------------------- masks


def hessian(X: np.ndarray, damping: float = DAMPING) -> np.ndarray:
    """H = X^T X / n + damping * mean(diag) I, float64 (K x K)."""
    Xd = X.astype(np.float64)
    H = Xd.T @ Xd / max(len(Xd), 1)
    H[np.diag_indices_from(H)] += damping * max(float(np.mean(np.diag(H))), 1e-30)
    return H


def obs_saliency(W: np.ndarray, hinv_diag: np.ndarray) -> np.ndarray:
    """w_kn^2 / [H^-1]_kk: the error of removing w_kn alone when the other weights may adapt."""
    return W.astype(np.float64) ** 2 / hinv_diag[:, None]


def select_mask(score: np.ndarray, sparsity: float, pattern: Pattern) -> np.ndarray:
    """Boolean keep-mask (K x N) of the most salient weights under `pattern` at `sparsity`."""
    K, N = score.shape
    if pattern.kind == "nm":
        groups = score.reshape(K // pattern.m, pattern.m, N)
        order = np.argsort(-groups, axis=1, kind="stable")[:, : pattern.n, :]
        keep = np.zeros(groups.shape, bool)
        np.put_along_axis(keep, order, True, axis=1)
        return keep.reshape(K, N)
    if pattern.kind == "block":
        R, C = pattern.n, pattern.m  # R outputs x C consecutive k
        blocks = score.reshape(K // C, C, N // R, R).sum(axis=(1, 3))
        keep = _top(blocks, sparsity)
        return np.repeat(np.repeat(keep, C, axis=0), R, axis=1)
    return _top(score, sparsity)


def _top(score: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask of the round((1 - sparsity) * size) largest entries (at least one)."""
    keep_count = max(1, round((1.0 - sparsity) * score.size))
    flat = score.reshape(-1)
    keep = np.zeros(flat.size, bool)
    if keep_count >= flat.size:
        keep[:] = True
    else:
        keep[np.argpartition(-flat, keep_count - 1)[:keep_count]] = True
    return keep.reshape(score.shape)


# ---------------------------------------------------------------------------------------- reconstruction


def refit(W: np.ndarray, keep: np.ndarray, H: np.ndarray, Hinv: np.ndarray) -> np.ndarray:
    """The exact masked least squares of the module doc, per column: W' (K x N, float64) zero off `keep`."""
    Wd = W.astype(np.float64)
    out = np.where(keep, Wd, 0.0)
    kept = keep.sum(axis=0)
    K = W.shape[0]
    support = [n for n in range(W.shape[1]) if 0 < kept[n] < K and kept[n] <= K - kept[n]]
    pruned = [n for n in range(W.shape[1]) if 0 < kept[n] < K and kept[n] > K - kept[n]]
    if support:
        cols = np.asarray(support)
        rhs = H @ Wd[:, cols]  # (H w)_S for every support column
        for pos, idx, valid in _batches(keep, support, True):
            b = np.where(valid, np.take_along_axis(rhs[:, pos].T, idx, axis=1), 0.0)
            sol = np.linalg.solve(_gather(H, idx, valid), b[..., None])[..., 0]
            j, i = np.nonzero(valid)
            out[idx[j, i], cols[pos][j]] = sol[j, i]
    if pruned:
        cols = np.asarray(pruned)
        for pos, idx, valid in _batches(keep, pruned, False):
            ns = cols[pos]
            wp = np.where(valid, np.take_along_axis(Wd[:, ns].T, idx, axis=1), 0.0)
            alpha = np.linalg.solve(_gather(Hinv, idx, valid), wp[..., None])[..., 0]  # ([H^-1]_PP)^-1 w_P
            j, i = np.nonzero(valid)
            scattered = np.zeros((K, len(ns)))
            scattered[idx[j, i], j] = alpha[j, i]
            out[:, ns] = np.where(keep[:, ns], Wd[:, ns] - Hinv @ scattered, 0.0)
    return out


def refit_cost(keep: np.ndarray) -> float:
    """Multiply-adds of `refit` (LU of the smaller system per column, 2/3 s^3)."""
    kept = keep.sum(axis=0).astype(np.float64)
    return float(np.sum(np.minimum(kept, keep.shape[0] - kept) ** 3) * 2 / 3)


def refit_sequential(W: np.ndarray, keep: np.ndarray, Hinv: np.ndarray, block: int = 128) -> np.ndarray:
    """SparseGPT's update for a fixed mask (the module doc's fallback for large layers): inputs k in order,
    each pruned w_kn removed with the OBS correction of the inputs after k, through the upper Cholesky factor
    U of H^-1 (H^-1 = U^T U); the corrections of a block of inputs reach the later ones in one product."""
    Wd = W.astype(np.float64).copy()
    U = np.linalg.cholesky(Hinv).T  # upper: row k holds the OBS direction of input k over inputs >= k
    K = W.shape[0]
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        Ub, Wb = U[i1:i2, i1:i2], Wd[i1:i2]
        E = np.zeros_like(Wb)
        for k in range(i2 - i1):
            e = np.where(keep[i1 + k], 0.0, Wb[k] / Ub[k, k])
            Wb[k:] -= np.outer(Ub[k, k:], e)
            E[k] = e
        Wd[i2:] -= U[i1:i2, i2:].T @ E
    return np.where(keep, Wd, 0.0)


def _batches(keep: np.ndarray, columns: list[int], on_support: bool):
    """(positions into `columns`, index matrix, validity) per batch: each column's support (or pruned set)
    padded to the batch's largest, columns sorted by that size so the padding stays small, and a batch's
    gathered systems at most BATCH_ELEMENTS numbers."""
    sets = [np.flatnonzero(keep[:, n] if on_support else ~keep[:, n]) for n in columns]
    order = np.argsort([len(s) for s in sets], kind="stable")
    chosen: list[int] = []
    for i in order:
        if chosen and (len(chosen) + 1) * len(sets[i]) ** 2 > BATCH_ELEMENTS:
            yield _padded(sets, chosen)
            chosen = []
        chosen.append(int(i))
    if chosen:
        yield _padded(sets, chosen)


def _padded(sets: list[np.ndarray], chosen: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    width = max(len(sets[i]) for i in chosen)
    idx = np.zeros((len(chosen), width), np.int64)
    valid = np.zeros((len(chosen), width), bool)
    for j, i in enumerate(chosen):
        idx[j, : len(sets[i])] = sets[i]
        valid[j, : len(sets[i])] = True
    return np.asarray(chosen), idx, valid


def _gather(A: np.ndarray, idx: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """A[idx_j, idx_j] per row j of idx, padded with the identity where `valid` is False."""
    G = A[idx[:, :, None], idx[:, None, :]]
    if not valid.all():
        G *= valid[:, :, None] & valid[:, None, :]
        pad = np.nonzero(~valid)
        G[pad[0], pad[1], pad[1]] = 1.0
    return G


def fit_error(W: np.ndarray, W_new: np.ndarray, H: np.ndarray) -> float:
    """sum_n (w_n - w'_n)^T H (w_n - w'_n): the layer's error on the fit rows (with the damping term)."""
    D = W.astype(np.float64) - W_new
    return float(np.einsum("kn,kn->", D, H @ D))


def restore_scores(
    W: np.ndarray, W_new: np.ndarray, keep: np.ndarray, H: np.ndarray, hinv_diag
) -> np.ndarray:
    """Scores for re-selecting the mask after a re-fit (module doc): removal cost for kept weights, the
    error a pruned weight's return alone removes for the others."""
    G = H @ (W.astype(np.float64) - W_new)
    return np.where(keep, W_new**2 / hinv_diag[:, None], G**2 / np.diag(H)[:, None])


@dataclass
class Pruned:
    """A pruned weight and how it was found."""

    weight: np.ndarray  # K x N float32, zeros off the mask
    keep: np.ndarray
    restores: int  # prune-and-restore rounds that improved the fit
    saliency: str
    refit: str = "none"  # "exact", "sequential" (SparseGPT's update, for large layers) or "none"


def prune(
    W: np.ndarray,
    X: np.ndarray | None,
    sparsity: float,
    pattern: Pattern,
    reconstruct: bool = True,
    saliency: str = "obs",
    restore_steps: int = RESTORE_STEPS,
    damping: float = DAMPING,
    factors: tuple[np.ndarray, np.ndarray] | None = None,
) -> Pruned:
    """W pruned to `sparsity` under `pattern`: OBS (or magnitude) mask on fit rows X, then, if asked, the
    exact re-fit and prune-and-restore rounds. `factors` = (H, H^-1) of X, to share between sparsities."""
    if X is None or saliency == "magnitude":
        keep = select_mask(W.astype(np.float64) ** 2, sparsity, pattern)
        if X is None or not reconstruct:
            return Pruned(np.where(keep, W, 0).astype(np.float32), keep, 0, "magnitude")
    H, Hinv = factors if factors is not None else hessian_pair(X, damping)
    hinv_diag = np.diag(Hinv)
    if saliency != "magnitude":
        keep = select_mask(obs_saliency(W, hinv_diag), sparsity, pattern)
    if not reconstruct:
        return Pruned(np.where(keep, W, 0).astype(np.float32), keep, 0, saliency)
    exact = refit_cost(keep) <= MAX_EXACT_REFIT

    def solve(mask: np.ndarray) -> np.ndarray:
        return refit(W, mask, H, Hinv) if exact else refit_sequential(W, mask, Hinv)

    W_new = solve(keep)
    err = fit_error(W, W_new, H)
    restores = 0
    for _ in range(restore_steps):
        keep2 = select_mask(restore_scores(W, W_new, keep, H, hinv_diag), sparsity, pattern)
        if np.array_equal(keep2, keep):
            break
        W2 = solve(keep2)
        err2 = fit_error(W, W2, H)
        if err2 >= err:
            break
        keep, W_new, err, restores = keep2, W2, err2, restores + 1
    return Pruned(W_new.astype(np.float32), keep, restores, saliency, "exact" if exact else "sequential")


def hessian_pair(X: np.ndarray, damping: float = DAMPING) -> tuple[np.ndarray, np.ndarray]:
    """(H, H^-1) of fit rows X (shared by every sparsity of a layer)."""
    H = hessian(X, damping)
    return H, np.linalg.inv(H)


def relative_error(W: np.ndarray, W_new: np.ndarray, X: np.ndarray | None, bias: np.ndarray | None) -> float:
    """||X (W - W')|| / ||X W + b|| on rows X; ||W - W'|| / ||W|| without them."""
    if X is None:
        return float(np.linalg.norm(W - W_new) / max(np.linalg.norm(W), 1e-30))
    Xd = X.astype(np.float64)
    Y = Xd @ W.astype(np.float64)
    diff = np.linalg.norm(Xd @ (W.astype(np.float64) - W_new.astype(np.float64)))
    return float(diff / max(np.linalg.norm(Y if bias is None else Y + bias), 1e-30))


# --------------------------------------------------------------------------------------------------- CSR


def to_csr(W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR of W^T for a K x N weight W: (values float32 [nnz], column indices int32 [nnz] ascending within a
    row, row pointers int64 [N + 1]); row n holds output n's nonzero weights over the inputs k."""
    if W.ndim != 2:
        raise ValueError(f"to_csr takes a K x N matrix, got shape {W.shape}")
    return reference_csr(np.ascontiguousarray(W.T))


def from_csr(values: np.ndarray, indices: np.ndarray, row_ptr: np.ndarray, K: int) -> np.ndarray:
    """The K x N weight W back from the CSR of W^T (to_csr's inverse)."""
    N = len(row_ptr) - 1
    Wt = np.zeros((N, K), np.float32)
    rows = np.repeat(np.arange(N), np.diff(row_ptr))
    Wt[rows, indices] = values
    return np.ascontiguousarray(Wt.T)


def csr_bytes(nnz: int, N: int) -> int:
    """Bytes of the CSR: 4 per value, 4 per int32 index, 8 per int64 row pointer (N + 1)."""
    return 8 * nnz + 8 * (N + 1)
