"""acdc: a Gemm or MatMul with a constant weight W (K x N, y = x W + b) becomes an ACDCMatMul, a stack of L
ACDC layers (Moczulski et al., "ACDC: A Structured Efficient Linear Layer", ICLR 2016).

Structure (onnxopt.reference.acdc). K and N are zero-padded to n, the power of two >= max(K, N). On column
vectors, layer l is h -> A_l C^T D_l C P_l h with A_l, D_l diagonal (n values each), C the orthonormal DCT-II
(C^T = C^-1, the DCT-III) and P_l a fixed permutation (identity for l = 0, seeded random after: the paper's
interleaved permutations). The stack F = A_{L-1} C^T D_{L-1} C P_{L-1} ... A_0 C^T D_0 C P_0 approximates
W^T (padded to n x n) and its first N outputs are kept: in row form, x W ≈ (x F^T)[:N]. Parameters 2 n L
(plus L n fixed permutation indices), cost per row O(L n log n).

Fit (calibration rows X of the layer's input, zero-padded to n; targets T = X W): minimise
    E(a_0, d_0, ..., a_{L-1}, d_{L-1}) = || T - F(X)[:, :N] ||_F^2
over the 2 L diagonals by alternating least squares. F is linear in each diagonal when the others are fixed:
with g (M x n) the rows just before diagonal q (the prefix applied to X) and S (n x N) the linear map from
just after q to the kept outputs, F(X)[:, :N] = g diag(q) S, so
    E(q) = || T - g diag(q) S ||^2,   normal equations  ((g^T g) o (S S^T)) q = rowsum((g^T T) o S)
(o the elementwise product), an n x n solve. A sweep updates the diagonals from the last (A_{L-1}) back to
the first (D_0): the prefixes g are computed once per sweep (they do not change while later diagonals are
updated) and S grows backwards one operation at a time. Each solve adds a ridge toward the current value,
lam ||q - q_old||^2 (lam = RIDGE times the mean diagonal), which keeps rank-deficient solves stable and
makes every update, hence every sweep, non-increasing in E. Start: all diagonals 1 (each layer the
identity). Cost per diagonal O(M n^2 + n^2 N + n^3): the pass declines n > MAX_N.

Without calibration data the fit uses the identity's K rows (X = I), i.e. it approximates W itself.

Estimated error: ||X W - X W_acdc|| / ||X W + b|| on held-out calibration rows (every other row; the fit
sees the rest), or ||W - W_acdc|| / ||W|| without data. Be warned: a trained dense layer is far from any
ACDC stack of moderate depth without retraining (the paper trains them end to end); the budget then
declines the rewrite, which is the expected outcome, reported with the error it would have cost.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import DOMAIN
from onnxopt.passes.dense import dense_kn, dense_layer, pad_last_axis, structured_problem
from onnxopt.reference.acdc import acdc_rows, dct_matrix
from onnxopt.rewrite import (
    Decline,
    Option,
    Pass,
    PassContext,
    new_name,
    replace_node,
)

MIN_DIM = 64  # K and N at least this: smaller layers gain nothing worth the DCTs
MAX_N = 1024  # the ALS fit costs O(n^3) per diagonal (~0.2 s at 1024 here): beyond this it takes minutes
DEPTHS = (1, 2, 4, 8)
SWEEPS = 6
MAX_FIT_ROWS = 1024  # calibration rows used per fit (and as many held out)
RIDGE = 1e-6  # of the mean diagonal of the normal matrix
PERM_SEED = 0


def padded_size(K: int, N: int) -> int:
    """n: the power of two >= max(K, N)."""
    return 1 << (max(K, N) - 1).bit_length()


def permutations(L: int, n: int, seed: int = PERM_SEED) -> np.ndarray:
    """P int64 [L, n]: identity for layer 0 (a permutation of the input alone adds nothing), seeded random
    permutations after it."""
    rng = np.random.default_rng(seed)
    return np.stack([np.arange(n) if l == 0 else rng.permutation(n) for l in range(L)]).astype(np.int64)


def _solve(g: np.ndarray, S: np.ndarray, T: np.ndarray, q_old: np.ndarray) -> np.ndarray:
    """argmin_q ||T - g diag(q) S||^2 + lam ||q - q_old||^2 (module doc)."""
    G = (g.T @ g) * (S @ S.T)
    r = np.einsum("ij,ij->i", g.T @ T, S)
    lam = RIDGE * max(float(np.trace(G)) / len(G), 1e-30)
    return np.linalg.solve(G + lam * np.eye(len(G)), r + lam * q_old)


def fit_als(
    X: np.ndarray,
    T: np.ndarray,
    L: int,
    sweeps: int = SWEEPS,
    P: np.ndarray | None = None,
    A: np.ndarray | None = None,
    D: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(A [L, n], D [L, n], training errors ||T - F(X)[:, :N]|| / ||T|| before and after each sweep) by
    alternating least squares (module doc); X [M, n] padded rows, T [M, N] targets, P the permutations."""
    X = np.asarray(X, np.float64)
    T = np.asarray(T, np.float64)
    n, N = X.shape[1], T.shape[1]
    P = permutations(L, n) if P is None else P
    A = np.ones((L, n)) if A is None else np.array(A, np.float64)
    D = np.ones((L, n)) if D is None else np.array(D, np.float64)
    C = dct_matrix(n)
    norm = max(float(np.linalg.norm(T)), 1e-30)
    history = [float(np.linalg.norm(T - acdc_rows(X, A, D, P)[:, :N])) / norm]
    for _ in range(sweeps):
        g_d, g_a = (
            [],
            [],
        )  # the rows just before D_l and just before A_l, with the diagonals of the last sweep
        H = X
        for layer in range(L):
            H = H[:, P[layer]] @ C.T
            g_d.append(H)
            H = (H * D[layer]) @ C
            g_a.append(H)
            H = H * A[layer]
        S = np.eye(n)[:, :N]  # from the output of the stack to the kept columns
        for layer in reversed(range(L)):
            A[layer] = _solve(g_a[layer], S, T, A[layer])
            S = C @ (A[layer][:, None] * S)  # now from just after D_l
            D[layer] = _solve(g_d[layer], S, T, D[layer])
            S = C.T @ (D[layer][:, None] * S)  # from just before the DCT of layer l
            S_prev = np.empty_like(S)
            S_prev[P[layer]] = S  # h -> h[:, p] is h times the matrix with rows S[i] at p[i]
            S = S_prev
        history.append(float(np.linalg.norm(T - acdc_rows(X, A, D, P)[:, :N])) / norm)
    return A, D, history


def relative_error(
    W: np.ndarray, A: np.ndarray, D: np.ndarray, P: np.ndarray, X: np.ndarray, bias: np.ndarray | None
) -> float:
    """||X W - F(X)[:, :N]|| / ||X W + bias|| on padded rows X; W is n x N (rows padded)."""
    Y = X.astype(np.float64) @ W.astype(np.float64)
    diff = np.linalg.norm(Y - acdc_rows(X, A, D, P)[:, : W.shape[1]])
    ref = Y + (0.0 if bias is None else bias.astype(np.float64))
    return float(diff / max(np.linalg.norm(ref), 1e-30))


def fit(
    W: np.ndarray, X: np.ndarray | None, bias: np.ndarray | None, L: int, sweeps: int = SWEEPS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(A, D, P, estimated error) of a depth-L stack for W (K x N unpadded), X rows of K or None."""
    K, N = W.shape
    n = padded_size(K, N)
    Wp = np.zeros((n, N))
    Wp[:K] = W
    P = permutations(L, n)
    if X is None or len(X) < 4:  # no data: fit W itself through the identity's rows
        rows = np.eye(n)[:K]
        A, D, _ = fit_als(rows, W, L, sweeps, P)
        return A, D, P, _plain(W, A, D, P)
    Xp = np.zeros((len(X), n))
    Xp[:, :K] = X
    train, held = Xp[0::2][:MAX_FIT_ROWS], Xp[1::2][:MAX_FIT_ROWS]
    A, D, _ = fit_als(train, train @ Wp, L, sweeps, P)
    return A, D, P, relative_error(Wp, A, D, P, held, bias)


def _plain(W: np.ndarray, A: np.ndarray, D: np.ndarray, P: np.ndarray) -> float:
    """||W - W_acdc|| / ||W||."""
    K, N = W.shape
    approx = acdc_rows(np.eye(A.shape[1])[:K], A, D, P)[:, :N]
    return float(np.linalg.norm(W - approx) / max(np.linalg.norm(W), 1e-30))


def stack_flops(rows: int, n: int, L: int) -> int:
    """Per row and layer two DCTs (~2.5 n log2 n each, as a real FFT) and the two diagonal products."""
    return int(rows * L * (5 * n * np.log2(n) + 2 * n))


class ACDC(Pass):
    name = "acdc"
    op_types = ("Gemm", "MatMul")
    lossy = True
    default = False
    summary = "Gemm/MatMul -> ACDCMatMul (stack of A C^T D C layers fitted by ALS, fast-DCT custom op)"
    custom_ops = ("ACDCMatMul",)

    def check(self, node: gs.Node, ctx: PassContext) -> str | None:
        if problem := structured_problem(node, ctx, MIN_DIM):
            return problem
        K, N = dense_kn(node)
        if padded_size(K, N) > MAX_N:
            return f"padded size {padded_size(K, N)} > {MAX_N}: the ALS fit (O(n^3) per diagonal) is too slow"
        if ctx.shapes.get(node.inputs[0].name) is None:
            return "input shape unknown (its rank is needed to pad K)"
        return None

    def activations_needed(self, node: gs.Node) -> list[str]:
        return [node.inputs[0].name]

    def options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        W, bias, X = dense_layer(node, ctx)
        K, N = W.shape
        n = padded_size(K, N)
        fixed = ctx.setting("depth", int)
        sweeps = ctx.setting("sweeps", int, SWEEPS)
        depths = [fixed] if fixed is not None else [L for L in DEPTHS if 2 * n * L < K * N]
        rank = len(ctx.shapes[node.inputs[0].name])
        rows = int(np.prod(ctx.shapes.get(node.outputs[0].name, (1, N))[:-1]))
        options, tried = [], []
        for L in depths:
            if L < 1:
                raise Decline(f"depth {L} must be >= 1")
            A, D, P, err = fit(W, X, bias, L, sweeps)
            tried.append(f"L={L}: {err:.3g}")
            if err > ctx.local_tolerance:
                continue
            # B is always emitted (zeros without a bias): it gives the op N, so no Slice is needed.
            params = 2 * n * L + N
            options.append(
                Option(
                    est_error=err,
                    params_after=params,
                    bytes_after=4 * params + 8 * L * n,
                    flops_after=stack_flops(rows, n, L),
                    emit=self._emitter(
                        ctx.park(A.astype(np.float32), D.astype(np.float32), P), K, N, bias, rank
                    ),
                    detail={"depth": L, "shape": [K, N], "padded": n, "sweeps": sweeps},
                )
            )
        if not options:
            raise Decline(
                f"no depth fits the tolerance {ctx.local_tolerance:g}: estimated errors "
                + ", ".join(tried)
                + " (the layer is not close to an ACDC stack)"
            )
        return options

    def _emitter(self, load, K: int, N: int, bias: np.ndarray | None, rank: int):
        def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
            A, D, P = load()
            n = A.shape[1]
            x, y = node.inputs[0], node.outputs[0]
            x, nodes = pad_last_axis(x, n - K, rank, prefix)
            B = np.zeros(N, np.float32) if bias is None else bias.astype(np.float32)
            inputs = [x, *(gs.Constant(new_name(prefix, k), v) for k, v in (("A", A), ("D", D), ("P", P)))]
            inputs.append(gs.Constant(new_name(prefix, "B"), B))
            nodes.append(
                gs.Node("ACDCMatMul", new_name(prefix, "acdc"), inputs=inputs, outputs=[y], domain=DOMAIN)
            )
            return replace_node(graph, node, nodes)

        return emit
