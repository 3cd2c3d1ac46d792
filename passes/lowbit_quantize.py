"""lowbit's roundings of a weight W (K x N, y = x W) to group-wise codes: round-to-nearest and GPTQ.

Grid. For output n and group g of G consecutive k, from the min and max of the group's weights (the range
widened to include 0, so that zero weights stay exact and an all-zero group is representable):
    scale = (max - min) / (2^bits - 1),   zero = round(-min / scale),   q = clip(round(w / scale) + zero)
and the layer computes with W~ = scale (q - zero).

RTN rounds every weight to its nearest grid point, independently.

GPTQ (Frantar et al., "GPTQ: accurate post-training quantization for generative pre-trained transformers",
ICLR 2023; after Optimal Brain Quantization) minimises ||X W - X W~||_F on calibration rows X. Rows k of W
are quantized in order; the rounding error of row k, e_k = (w_k - w~_k) / [U]_kk, is pushed onto the rows not
yet quantized, W[j] -= U[k, j] e_k (j > k), where U is the upper Cholesky factor of H^-1, H = X^T X + damping
(the inverse-Hessian update of OBS, for all later rows at once). The group's scale and zero are taken when
its first row is reached, from the weights as updated so far. Updates within a block of rows are applied
row by row, and to the rows after the block once per block (a matrix product), which gives the same result.
"""

from __future__ import annotations

import numpy as np

DAMPING = 0.01  # of the mean diagonal of H
BLOCK = 128  # rows per lazy-update block (rounded up to a multiple of the group size)


def grid(Wg: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32, zero uint8) per column of a group's weights Wg [G, N]."""
    maxq = (1 << bits) - 1
    lo = np.minimum(Wg.min(axis=0), 0.0)
    hi = np.maximum(Wg.max(axis=0), 0.0)
    scale = ((hi - lo) / maxq).astype(np.float32)
    scale[scale <= 0] = 1.0  # an all-zero group: any scale, zero 0
    zero = np.clip(np.round(-lo / scale), 0, maxq).astype(np.uint8)
    return scale, zero


def to_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Nearest codes of w on the grid (scale, zero); w [..., N]."""
    return np.clip(np.round(w / scale) + zero, 0, (1 << bits) - 1).astype(np.uint8)


def dequantize(q: np.ndarray, S: np.ndarray, Z: np.ndarray, G: int) -> np.ndarray:
    """W~ [Kp, N] (float64) from codes q [Kp, N] and S, Z [N, Kp / G]."""
    g = np.arange(q.shape[0]) // G
    return (q.astype(np.float64) - Z.T[g]) * S.T.astype(np.float64)[g]


def rtn(W: np.ndarray, bits: int, G: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q [Kp, N] uint8, S [N, Kp/G] float32, Z [N, Kp/G] uint8) by round-to-nearest; W [Kp, N], G | Kp."""
    Kp, N = W.shape
    Wg = W.reshape(Kp // G, G, N)
    S, Z = np.empty((N, Kp // G), np.float32), np.empty((N, Kp // G), np.uint8)
    q = np.empty((Kp, N), np.uint8)
    for g in range(Kp // G):
        S[:, g], Z[:, g] = grid(Wg[g], bits)
        q[g * G : (g + 1) * G] = to_codes(Wg[g], S[:, g], Z[:, g], bits)
    return q, S, Z


def inverse_factor(X: np.ndarray, Kp: int, damping: float = DAMPING) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): U the upper Cholesky factor of (X^T X + damping)^-1 over Kp inputs (X zero-padded), and the
    inputs the rows never touch (their weights cannot matter to the outputs and are set to zero)."""
    Xp = np.zeros((len(X), Kp))
    Xp[:, : X.shape[1]] = X
    H = Xp.T @ Xp
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H[np.diag_indices(Kp)] += damping * float(np.mean(np.diag(H)))
    Hinv = np.linalg.inv(H)
    Hinv = (Hinv + Hinv.T) / 2
    return np.linalg.cholesky(Hinv).T, dead


def gptq(
    W: np.ndarray, U: np.ndarray, dead: np.ndarray, bits: int, G: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, S, Z) as rtn, with GPTQ's error-compensating rounding (module docstring); W [Kp, N]."""
    Kp, N = W.shape
    W = W.astype(np.float64).copy()
    W[dead] = 0.0
    q = np.empty((Kp, N), np.uint8)
    S, Z = np.empty((N, Kp // G), np.float32), np.empty((N, Kp // G), np.uint8)
    block = -(-BLOCK // G) * G
    for i1 in range(0, Kp, block):
        i2 = min(i1 + block, Kp)
        W1, U1 = W[i1:i2].copy(), U[i1:i2, i1:i2]
        E = np.zeros_like(W1)
        for i in range(i2 - i1):
            k = i1 + i
            if k % G == 0:
                S[:, k // G], Z[:, k // G] = grid(W1[i : i + G], bits)
            s, z = S[:, k // G].astype(np.float64), Z[:, k // G].astype(np.float64)
            q[k] = to_codes(W1[i], s, z, bits)
            E[i] = (W1[i] - s * (q[k] - z)) / U1[i, i]
            W1[i + 1 :] -= np.outer(U1[i, i + 1 :], E[i])
        W[i2:] -= U[i1:i2, i2:].T @ E
    return q, S, Z
