"""tensor_train: a Gemm or MatMul with a constant weight W (K x N, y = x W + b) as a tensor-train matrix
(Novikov et al., "Tensorizing Neural Networks"), executed by standard ONNX ops.

Factor K = k_1 ... k_d and N = n_1 ... n_d (d = 2 or 3, factors as equal as the sizes allow). Then
    W[(i_1 .. i_d), (j_1 .. j_d)] = G_1[i_1, j_1] G_2[i_2, j_2] ... G_d[i_d, j_d]
with cores G_m [r_{m-1}, k_m, n_m, r_m] (r_0 = r_d = 1; each G_m[i, j] an r_{m-1} x r_m matrix). TT-SVD finds
them: reorder W into the tensor T[(i_1 j_1), ..., (i_d j_d)] and split it by successive truncated SVDs of its
unfoldings, each at rank r; the truncation error satisfies ||W - W_tt||_F^2 <= sum of the discarded singular
values squared over all splits. Params sum_m r_{m-1} k_m n_m r_m, against K N.

Execution: x [B, K] is reshaped to [B, k_1, ..., k_d] and contracted with one core at a time by Einsum,
    t_m[b, k_{m+1}.., n_1..n_m, r_m] = sum_{k_m, r_{m-1}} t_{m-1}[...] G_m[r_{m-1}, k_m, n_m, r_m],
then reshaped to [B, N] (plus the bias). Errors are measured on held-out calibration rows as for lowrank;
without calibration data, on W. Trained dense layers are rarely close to a low-rank tensor train without
retraining: the budget is what rejects them, with the error they would have cost.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.dense import dense_bias, dense_kn, dense_weight, structured_problem
from onnxopt.rewrite import Decline, Option, Pass, PassContext, new_name, replace_node

MIN_DIM = 64
RANKS = (2, 4, 8, 16, 32, 64)
MAX_ROWS = 2048
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def factorize(n: int, d: int) -> list[int] | None:
    """n as d factors, as equal as possible (largest first), each > 1; None if n has no such split."""
    factors, rest = [], n
    for m in range(d, 0, -1):
        target = round(rest ** (1 / m))
        f = next(
            (c for c in sorted(range(2, rest + 1), key=lambda c: (abs(c - target), c)) if rest % c == 0), None
        )
        if f is None or (m > 1 and f == rest):
            return None
        factors.append(f)
        rest //= f
    return sorted(factors, reverse=True) if rest == 1 else None


def tt_svd(W: np.ndarray, ks: list[int], ns: list[int], rank: int) -> list[np.ndarray]:
    """Cores G_m [r_{m-1}, k_m, n_m, r_m] of W (K x N) with every TT rank at most `rank`."""
    d = len(ks)
    T = W.astype(np.float64).reshape(*ks, *ns)
    T = T.transpose([ax for m in range(d) for ax in (m, d + m)])  # (i_1, j_1, i_2, j_2, ...)
    cores, r_prev = [], 1
    M = T.reshape(r_prev * ks[0] * ns[0], -1)
    for m in range(d - 1):
        U, s, Vt = np.linalg.svd(M, full_matrices=False)
        r = min(rank, len(s))
        cores.append(U[:, :r].reshape(r_prev, ks[m], ns[m], r).astype(np.float32))
        M = (s[:r, None] * Vt[:r]).reshape(r * ks[m + 1] * ns[m + 1], -1)
        r_prev = r
    cores.append(M.reshape(r_prev, ks[-1], ns[-1], 1).astype(np.float32))
    return cores


def tt_weight(cores: list[np.ndarray]) -> np.ndarray:
    """W (K x N) from its cores."""
    T = cores[0][0]  # [k_1, n_1, r_1]
    for G in cores[1:]:
        T = np.einsum("...r,rknq->...knq", T, G, optimize=True)
    T = T[..., 0]
    d = len(cores)
    order = [2 * m for m in range(d)] + [2 * m + 1 for m in range(d)]
    K = math.prod(G.shape[1] for G in cores)
    return T.transpose(order).reshape(K, -1)


def tt_params(cores: list[np.ndarray]) -> int:
    return sum(G.size for G in cores)


def tt_flops(cores: list[np.ndarray], rows: int) -> int:
    """Multiply-adds x 2 of the Einsum chain: step m contracts k_m and r_{m-1} for every remaining k, every
    produced n and r_m."""
    ks = [G.shape[1] for G in cores]
    total, done_n = 0, 1
    for m, G in enumerate(cores):
        r0, k, n, r1 = G.shape
        total += 2 * rows * math.prod(ks[m + 1 :]) * done_n * r0 * k * n * r1
        done_n *= n
    return total


def equations(d: int) -> list[str]:
    """Einsum equations contracting x [b, k_1..k_d] with the cores one at a time."""
    ks, ns, rs = LETTERS[1 : d + 1], LETTERS[d + 1 : 2 * d + 1], LETTERS[2 * d + 1 : 3 * d + 2]
    eqs, state = [], "a" + ks  # b = 'a'
    for m in range(d):
        core = rs[m] + ks[m] + ns[m] + rs[m + 1]
        rest = state.replace(ks[m], "").replace(rs[m], "")
        out = rest + ns[m] + rs[m + 1]
        lhs_core = core if m else core[1:]  # the first core is passed without its r_0 = 1 axis
        eqs.append(f"{state},{lhs_core}->{out}")
        state = out
    return eqs


class TensorTrain(Pass):
    name = "tensor_train"
    op_types = ("Gemm", "MatMul")
    lossy = True
    default = False
    summary = "Gemm/MatMul -> tensor-train cores contracted by Einsum (TT-SVD; standard ops)"

    def check(self, node: gs.Node, ctx: PassContext) -> str | None:
        if problem := structured_problem(node, ctx, MIN_DIM):
            return problem
        K, N = dense_kn(node)
        if not any(factorize(K, d) and factorize(N, d) for d in (2, 3)):
            return f"{K} or {N} has no split into 2 or 3 factors > 1 (a prime size)"
        x = ctx.shapes.get(node.inputs[0].name)
        if x is None or len(x) < 2:
            return f"input shape {x} is not [..., K]"
        return None

    def activations_needed(self, node: gs.Node) -> list[str]:
        return [node.inputs[0].name]

    def options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        W = dense_weight(node)
        K, N = W.shape
        bias = dense_bias(node, N)
        X = ctx.activations.get(node.inputs[0].name)
        held = X.reshape(-1, K)[1::2][:MAX_ROWS] if X is not None and X.size >= 4 * K else None
        fixed = ctx.setting("rank", int)
        rows = int(np.prod(ctx.shapes.get(node.outputs[0].name, (1, N))[:-1]))
        found, tried = [], []
        for d in (3, 2):
            ks, ns = factorize(K, d), factorize(N, d)
            if not ks or not ns:
                continue
            for rank in [fixed] if fixed else RANKS:
                cores = tt_svd(W, ks, ns, rank)
                params = tt_params(cores)
                if params >= K * N:
                    continue
                err = _error(W, tt_weight(cores), held, bias)
                tried.append(f"d={d} r={rank}: {err:.3g}")
                flops = tt_flops(cores, rows)
                if flops >= 2 * rows * K * N:  # high TT ranks cost more multiply-adds than the dense layer
                    continue
                if err <= ctx.local_tolerance:
                    found.append((params, err, flops, d, rank, ks, ns, ctx.park(*cores)))
        if not found:
            raise Decline(
                f"no tensor train fits the tolerance {ctx.local_tolerance:g}: estimated errors "
                + ", ".join(tried)
            )
        found.sort(key=lambda f: f[0])
        extra = N if bias is not None else 0
        return [
            Option(
                est_error=err,
                params_after=params + extra,
                bytes_after=4 * (params + extra),
                flops_after=flops,
                emit=_emitter(load, N, bias, len(ctx.shapes[node.inputs[0].name])),
                detail={"cores": d, "rank": rank, "factors": [ks, ns]},
            )
            for params, err, flops, d, rank, ks, ns, load in found
        ]


def _error(W: np.ndarray, W_tt: np.ndarray, X: np.ndarray | None, bias: np.ndarray | None) -> float:
    if X is None:
        return float(np.linalg.norm(W - W_tt) / max(np.linalg.norm(W), 1e-30))
    Xd = X.astype(np.float64)
    Y = Xd @ W
    ref = Y + (0.0 if bias is None else bias)
    return float(np.linalg.norm(Xd @ (W - W_tt)) / max(np.linalg.norm(ref), 1e-30))


def _leading_dims(x: gs.Variable, out: gs.Variable, prefix: str) -> list[gs.Node]:
    """Shape(x)[:-1] into `out`."""
    full = gs.Variable(new_name(prefix, "x_shape"), dtype=np.int64)
    start = gs.Constant(new_name(prefix, "start"), np.array([0], np.int64))
    end = gs.Constant(new_name(prefix, "end"), np.array([-1], np.int64))
    return [
        gs.Node("Shape", new_name(prefix, "shape"), inputs=[x], outputs=[full]),
        gs.Node("Slice", new_name(prefix, "lead"), inputs=[full, start, end], outputs=[out]),
    ]


def _emitter(load, N: int, bias: np.ndarray | None, in_rank: int):
    def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
        cores = list(load())
        d = len(cores)
        ks = [G.shape[1] for G in cores]
        x, y = node.inputs[0], node.outputs[0]
        nodes = []
        t = gs.Variable(new_name(prefix, "x_split"), dtype=np.float32)
        shape = gs.Constant(new_name(prefix, "split_shape"), np.array([-1, *ks], np.int64))
        nodes.append(gs.Node("Reshape", new_name(prefix, "split"), inputs=[x, shape], outputs=[t]))
        for m, (eq, G) in enumerate(zip(equations(d), cores, strict=True)):
            core = gs.Constant(new_name(prefix, f"core{m}"), G if m else G[0])
            out = gs.Variable(new_name(prefix, f"t{m}"), dtype=np.float32)
            nodes.append(
                gs.Node("Einsum", new_name(prefix, f"contract{m}"), {"equation": eq}, [t, core], [out])
            )
            t = out
        flat = y if bias is None else gs.Variable(new_name(prefix, "flat"), dtype=np.float32)
        shape = gs.Constant(new_name(prefix, "merge_shape"), np.array([-1, N], np.int64))
        if in_rank > 2:  # [..., K] rows (a transformer's [batch, seq, K]): restore the leading dims
            lead = gs.Variable(new_name(prefix, "lead"), dtype=np.int64)
            nodes += _leading_dims(x, lead, prefix)
            out_shape = gs.Variable(new_name(prefix, "out_shape"), dtype=np.int64)
            n = gs.Constant(new_name(prefix, "n"), np.array([N], np.int64))
            nodes.append(gs.Node("Concat", new_name(prefix, "concat"), {"axis": 0}, [lead, n], [out_shape]))
            shape = out_shape
        nodes.append(gs.Node("Reshape", new_name(prefix, "merge"), inputs=[t, shape], outputs=[flat]))
        if bias is not None:
            b = gs.Constant(new_name(prefix, "bias"), np.ascontiguousarray(bias, dtype=np.float32))
            nodes.append(gs.Node("Add", new_name(prefix, "add_bias"), inputs=[flat, b], outputs=[y]))
        return replace_node(graph, node, nodes)

    return emit
