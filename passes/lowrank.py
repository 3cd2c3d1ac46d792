"""lowrank: a Gemm or MatMul with constant weights W (K x N) becomes two, through a truncated SVD.

W = L diag(s) Q^T;  W_r = (L_r s_r^{1/2}) (s_r^{1/2} Q_r^T) = U V, U: K x r, V: r x N.
y = x W + b  ->  y = (x U) V + b: params and FLOPs fall from K·N to r·(K + N), a gain only for
r < K·N / (K + N); a rank is offered only where it cuts them by MIN_GAIN (1.25x).
Plain: L = P from the SVD W = P diag(s) Q^T, the best rank r in ||W - W_r||_F.
Data-aware (default when calibration activations X, the rows of the layer's input, are known): with
C = X^T X / n + d·mean(eig C)·I (damping d keeps directions the calibration data never visits) and
S = C^{1/2}, the SVD S W = P diag(s) Q^T gives L = S^{-1} P, the best rank r in ||X (W - W_r)||_F: the
layer's outputs, not its weights, are what must stay close.
Either way W - W_r = sum_{i>r} L_i s_i q_i^T with orthonormal q_i, so the error on X is
||X W - X W_r||_F^2 = sum_{i>r} s_i^2 ||X L_i||^2, relative to ||X W + b||_F.
Output-aware (default when the layer feeds one more constant Gemm/MatMul, through a ReLU or not): the
error is weighted by what that next layer passes on, and measured at its output (lowrank_output.py);
`--set lowrank.output_aware=0` keeps the data-aware fit.
The rank is the smallest whose estimate fits the budget (or `--set lowrank.rank=R`); less lossy options
(the error halved, quartered, ...) are offered for the pass manager's rollback.
Conv layers (group 1) are factorized into chains of Convs with `--set lowrank.conv=1`: see lowrank_conv.py.
Standard ONNX ops only: the result runs in stock onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.dense import dense_bias, dense_kn, dense_problem, dense_weight
from onnxopt.passes.lowrank_output import (
    NextLayer,
    next_layer,
    next_output_norm,
    output_aware_svd,
    output_weight,
)
from onnxopt.passes.lowrank_output import error_by_rank as output_error_by_rank
from onnxopt.rewrite import (
    LOCAL_SLACK,
    Decline,
    Option,
    Pass,
    PassContext,
    new_name,
    replace_node,
    weight_problem,
)

MAX_ROWS = 8192
# A factorization must cut the layer's params at least this much: below it, the extra node costs about what
# the smaller GEMMs save, and a near-full-rank factor of a small layer (a 1024x10 head at rank 9 saves 10%)
# would spend the model's error budget that a large layer turns into real savings.
MIN_GAIN = 1.25
STEPS = 8  # number of progressively less lossy options offered per node (tolerance halved each)
DAMPING = 0.01  # of the mean eigenvalue of X^T X / n, added to its diagonal


def svd(W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD W = P diag(s) Qt (float32 LAPACK: the estimates need no more, and it is twice as fast)."""
    return np.linalg.svd(W.astype(np.float32), full_matrices=False)


def weighted_svd(
    W: np.ndarray, X: np.ndarray, damping: float = DAMPING
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(L, s, Qt) with W = L diag(s) Qt and truncations optimal in ||X (W - W_r)||_F (see the module doc)."""
    Xd = X.astype(np.float64)
    lam, E = np.linalg.eigh(Xd.T @ Xd / len(Xd))
    lam = np.maximum(lam, 0.0)
    lam += damping * max(float(lam.mean()), 1e-30)
    root = np.sqrt(lam)
    P, s, Qt = np.linalg.svd(
        ((E * root) @ (E.T @ W.astype(np.float64))).astype(np.float32), full_matrices=False
    )
    L = (E / root) @ (E.T @ P.astype(np.float64))
    return L.astype(np.float32), s, Qt


def split(P: np.ndarray, s: np.ndarray, Qt: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """U (K x r), V (r x N) from a (weighted) SVD, the singular values shared as square roots."""
    root = np.sqrt(s[:rank])
    return (P[:, :rank] * root).astype(np.float32), (root[:, None] * Qt[:rank]).astype(np.float32)


def factorize(W: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """U (K x r), V (r x N) with U V the best rank-r approximation of W in Frobenius norm."""
    return split(*svd(W), rank)


def error_by_rank(
    W: np.ndarray,
    X: np.ndarray | None,
    bias: np.ndarray | None,
    factors: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """err[r] = relative error of the rank-r truncation on activations X (or on W itself without X)."""
    P, s, _ = factors if factors is not None else svd(W)
    s = s.astype(np.float64)
    if X is None:
        energy = s**2
        total = float(np.sum(energy))
    else:
        Xd = X.astype(np.float64)
        energy = s**2 * np.sum((Xd @ P.astype(np.float64)) ** 2, axis=0)
        Y = Xd @ W.astype(np.float64)
        if bias is not None:
            Y = Y + bias.astype(np.float64)
        total = float(np.sum(Y**2))
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])  # tail[r] = sum_{i>=r} energy_i
    return np.sqrt(np.maximum(tail, 0.0) / max(total, 1e-30))


def max_useful_rank(K: int, N: int) -> int:
    """Largest rank that cuts params and FLOPs by at least MIN_GAIN: r (K + N) MIN_GAIN <= K N."""
    return int(K * N / (MIN_GAIN * (K + N)))


def rows(X: np.ndarray, K: int, seed: int = 0) -> np.ndarray:
    """Calibration activations as an (n, K) matrix, subsampled to at most MAX_ROWS rows."""
    X2 = X.reshape(-1, K)
    if len(X2) > MAX_ROWS:
        X2 = X2[np.random.default_rng(seed).choice(len(X2), MAX_ROWS, replace=False)]
    return X2


def _first_fit(err: np.ndarray, tol: float, r_max: int) -> int:
    fits = np.nonzero(err[: r_max + 1] <= tol)[0]
    return int(fits[0]) if len(fits) else r_max + 1


def fit(
    W: np.ndarray,
    X: np.ndarray | None,
    bias: np.ndarray | None,
    tol: float,
    r_max: int,
    data_aware: bool = True,
    rank: int | None = None,
) -> tuple[str, tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """(kind, factors, err by rank): the plain or the data-aware SVD, whichever fits `tol` at a lower rank,
    or, with a fixed `rank`, whichever errs less at that rank (a loose `tol` fits both at rank 1 and would
    otherwise pick the plain SVD whatever the rank).

    With activations, the errors are measured on rows the fit did not see (every other row), so a data-aware
    fit that only memorised a small calibration set shows it in its estimate instead of in production.
    """
    plain = svd(W)
    if X is None or len(X) < 4:
        return "plain", plain, error_by_rank(W, X, bias, plain)
    held_out = X[1::2]
    err_plain = error_by_rank(W, held_out, bias, plain)
    if not data_aware:
        return "plain", plain, err_plain
    weighted = weighted_svd(W, X[0::2])
    err_weighted = error_by_rank(W, held_out, bias, weighted)
    if rank is not None:
        better = err_weighted[rank] < err_plain[rank]
    else:
        better = _first_fit(err_weighted, tol, r_max) < _first_fit(err_plain, tol, r_max)
    if better:
        return "data-aware", weighted, err_weighted
    return "plain", plain, err_plain


def _flag(value: str) -> bool:
    return value.lower() not in ("0", "false", "no")


def output_aware_fit(
    W: np.ndarray, X: np.ndarray, bias: np.ndarray | None, nxt: NextLayer
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """(factors, err by rank) of the output-aware fit (lowrank_output), fitted on every other row of X and
    measured, relative to the next layer's output, on the rest."""
    train, held = X[0::2], X[1::2]
    factors = output_aware_svd(W, train, output_weight(train, W, bias, nxt))
    norm = next_output_norm(held, W, bias, nxt)
    return factors, output_error_by_rank(factors[0], factors[1], held, norm)


def tolerance_ladder(tol: float) -> list[float]:
    """The error tolerances of the options offered per node: tol, tol / 2, ... (STEPS of them)."""
    return [tol / 2**k for k in range(STEPS)]


class LowRank(Pass):
    name = "lowrank"
    op_types = ("Gemm", "MatMul", "Conv")
    lossy = True
    summary = "Gemm/MatMul -> two MatMuls (truncated SVD); Conv -> channel, spatial or Tucker-2 Conv chains"

    def check(self, node: gs.Node, ctx: PassContext) -> str | None:
        if problem := weight_problem(node):
            return problem
        if node.op == "Conv":
            if not ctx.setting("conv", lambda v: v.lower() not in ("0", "false", "no"), False):
                # Opt-in: trained convolutions rarely stay within an output budget once factorized without
                # retraining (on Fashion-MNIST at the default budget every one is undone), and planning them
                # costs time on every model.
                return "Conv factorization is opt-in: --set lowrank.conv=1"
            from onnxopt.passes.lowrank_conv import conv_check  # it builds on this module's fits

            return conv_check(node, ctx)
        if problem := dense_problem(node, ctx):
            return problem
        K, N = dense_kn(node)
        if max_useful_rank(K, N) < 1:
            return f"weight {K}x{N} is too small for a factorization to pay off"
        return None

    def activations_needed(self, node: gs.Node) -> list[str]:
        return [node.inputs[0].name]

    def options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        if node.op == "Conv":
            from onnxopt.passes.lowrank_conv import conv_options

            return conv_options(node, ctx)
        W = dense_weight(node)
        K, N = W.shape
        bias = dense_bias(node, N)
        X = ctx.activations.get(node.inputs[0].name)
        X = rows(X, K) if X is not None else None
        data_aware = ctx.setting("data_aware", _flag, True)
        r_max = min(max_useful_rank(K, N), K, N)
        fixed = ctx.setting("rank", int)
        if fixed is not None and not 1 <= fixed <= r_max:
            raise Decline(f"rank {fixed} does not pay off for a {K}x{N} weight (1 <= rank <= {r_max})")
        kind, factors, err = fit(W, X, bias, ctx.local_tolerance, r_max, data_aware, fixed)
        if X is not None and len(X) >= 4 and data_aware and ctx.setting("output_aware", _flag, True):
            if (nxt := next_layer(node, {t.name for t in ctx.graph.outputs}, N)) is not None:
                kind, factors, err = "output-aware", *output_aware_fit(W, X, bias, nxt)
        if fixed is not None:
            ranks = [fixed]
        else:
            ranks = []
            for tol in tolerance_ladder(ctx.local_tolerance):
                fits = np.nonzero(err[: r_max + 1] <= tol)[0]
                if len(fits):
                    r = max(int(fits[0]), 1)
                    if r not in ranks:
                        ranks.append(r)
            if not ranks:
                raise Decline(
                    f"no rank up to {r_max} (where it stops cutting the layer by {MIN_GAIN:g}x) fits: "
                    f"error at rank {r_max} is {err[r_max]:.3g} > {ctx.local_tolerance:g} "
                    f"({LOCAL_SLACK:g}x the budget)"
                )
        M_rows = int(np.prod(ctx.shapes.get(node.outputs[0].name, (1, N))[:-1]))
        # The factors every option needs (up to the least lossy one's rank) wait on disk, not in memory.
        top = max(ranks)
        load = ctx.park(factors[0][:, :top], factors[1][:top], factors[2][:top])
        del factors
        return [
            Option(
                est_error=float(err[r]),
                params_after=r * (K + N) + (N if bias is not None else 0),
                bytes_after=4 * (r * (K + N) + (N if bias is not None else 0)),
                flops_after=2 * M_rows * r * (K + N),
                emit=self._emitter(load, r),
                detail={
                    "rank": r,
                    "shape": [K, N],
                    "max_useful_rank": r_max,
                    "fit": kind,
                },
            )
            for r in ranks
        ]

    def _emitter(self, load, rank: int):
        def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
            U, V = split(*load(), rank)
            x, y = node.inputs[0], node.outputs[0]
            mid = gs.Variable(new_name(prefix, "mid"), dtype=np.float32)
            first = gs.Node(
                "MatMul",
                new_name(prefix, "U"),
                inputs=[x, gs.Constant(new_name(prefix, "U_w"), U)],
                outputs=[mid],
            )
            if node.op == "Gemm":
                inputs = [mid, gs.Constant(new_name(prefix, "V_w"), V)]
                attrs = {}
                if len(node.inputs) > 2 and node.inputs[2].name:
                    inputs.append(node.inputs[2])
                    attrs["beta"] = float(node.attrs.get("beta", 1.0))
                second = gs.Node("Gemm", new_name(prefix, "V"), attrs=attrs, inputs=inputs, outputs=[y])
            else:
                second = gs.Node(
                    "MatMul",
                    new_name(prefix, "V"),
                    inputs=[mid, gs.Constant(new_name(prefix, "V_w"), V)],
                    outputs=[y],
                )
            return replace_node(graph, node, [first, second])

        return emit
