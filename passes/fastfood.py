"""fastfood: a Gemm or MatMul with a constant weight W (K x N, y = x W + b) becomes a FastfoodMatMul, a stack
of d Adaptive Fastfood blocks (Yang et al., "Deep Fried Convnets", ICCV 2015).

Structure. n = the smallest power of two >= max(K, N). One block maps R^n -> R^n as V z = S H G Pi H B z,
with B, G, S diagonal, H the n x n Walsh-Hadamard matrix and Pi a permutation. W^T is approximated by
V_d ... V_1 (block 1 applied first): the input row is zero-padded to n inside the op, and the first N values
of the result are kept, so no Pad or Slice is needed (onnxopt.reference.fastfood states the op exactly).
Depth d = 1, 2, 4 ("stacked as needed": the smallest depth whose error fits the budget wins, being the most
compressive). Params 3 n d floats + d permutations (n int64 each) + the bias, against K N.

Fit (calibration rows X of the layer's input; without them, Gaussian rows, for which E||X (W - V)||^2 is
proportional to ||W - V||_F^2). Minimise L = ||X W - (X V^T)[:, :N]||_F^2 / ||X W||_F^2 over the diagonals:
- B_t are fixed random signs and Pi_t fixed random permutations (seeded): they are what makes a block mix its
  input; the paper fixes Pi too, and B in {+1, -1} keeps H B an orthogonal map up to scale.
- Inside the fit H is used normalised (H / sqrt(n), orthogonal, so every stage keeps the norm of its input);
  the two factors 1 / sqrt(n) of each block are folded into S at the end.
- The last S (S_d) enters L linearly and per output coordinate: for the other parameters fixed, its optimum
  is closed form, S_d[j] = sum_m T[m, j] f[m, j] / sum_m f[m, j]^2 (f the values it multiplies, T the
  targets). It is re-solved at every step (variable projection), so the gradient method below only moves
  G_1..G_d and S_1..S_{d-1}, whose gradients (by the envelope theorem) are those of L at the optimal S_d.
- G_t and S_t (t < d) by Adam on L, gradients by backpropagation through the block: H is symmetric, so its
  adjoint is itself; the gather's adjoint is the scatter. The best iterate (by L on the fitting rows) is kept.
Estimated error: relative to ||X W + b||_F on held-out calibration rows (every other row; the fit sees the
rest). Trained dense layers are far from Fastfood without retraining: the budget then declines the layer and
the report shows the error it would have cost.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import DOMAIN
from onnxopt.passes.dense import dense_kn, dense_layer, structured_problem
from onnxopt.reference.fastfood import fastfood_matmul, fwht
from onnxopt.rewrite import (
    Decline,
    Option,
    Pass,
    PassContext,
    new_name,
    replace_node,
)

MIN_DIM = 64  # K and N at least this: smaller layers gain nothing worth the transforms
MAX_N = 1 << 14
DEPTHS = (1, 2, 4)
MAX_FIT_ROWS = 512  # calibration rows used per fit (and as many held out)
MIN_ROWS = 64  # fewer calibration rows than this: Gaussian rows instead (too few to fit 2 n d values)
ITERS = 300
LR = 0.02
SEED = 0
# Fit work cap, in butterfly element-stages (rows x n x log2 n per transform, 4 d transforms per step): a
# 4096-wide layer gets ~40 steps instead of ITERS, so an opt-in pass on a large model ends in minutes.
WORK = 4e9
MIN_ITERS = 40


def padded_size(K: int, N: int) -> int:
    """n: the smallest power of two >= max(K, N)."""
    return 1 << (max(K, N) - 1).bit_length()


def fixed_parts(d: int, n: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The fixed random signs B [d, n] (float32) and permutations P [d, n] (int64) of a depth-d stack."""
    rng = np.random.default_rng(seed)
    B = rng.choice(np.array([-1.0, 1.0], np.float32), (d, n))
    P = np.stack([rng.permutation(n) for _ in range(d)]).astype(np.int64)
    return B, P


def _forward(Z: np.ndarray, B, G, S, P) -> tuple[np.ndarray, list]:
    """Rows Z [M, n] through the stack with normalised H; returns the output and what backprop needs."""
    scale = 1.0 / np.sqrt(Z.shape[1])
    saved = []
    for t in range(len(B)):
        c = (fwht(B[t] * Z) * scale)[:, P[t]]
        f = fwht(G[t] * c) * scale
        saved.append((c, f))
        Z = S[t] * f
    return Z, saved


def _last_s(T: np.ndarray, f: np.ndarray, N: int) -> np.ndarray:
    """The closed-form optimal last diagonal S_d for targets T [M, N] and its inputs f [M, n] (0 beyond N)."""
    s = np.zeros(f.shape[1])
    den = np.einsum("mj,mj->j", f[:, :N], f[:, :N])
    s[:N] = np.einsum("mj,mj->j", T, f[:, :N]) / np.maximum(den, 1e-30)
    return s


def fit_stack(
    X: np.ndarray, T: np.ndarray, d: int, n: int, iters: int = ITERS, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """(B, G, S, P, losses) of a depth-d stack fitted to targets T [M, N] = X W on rows X [M, K] (module
    doc); S carries H's scales as the op wants them. losses[i] = relative squared error at step i."""
    M, K = X.shape
    N = T.shape[1]
    B, P = fixed_parts(d, n, seed)
    B64 = B.astype(np.float64)
    Z0 = np.zeros((M, n))
    Z0[:, :K] = X
    T = T.astype(np.float64)
    tnorm = max(float(np.sum(T * T)), 1e-30)
    G = np.ones((d, n))
    S = np.ones((d, n))
    m1, m2 = np.zeros((2, d, n)), np.zeros((2, d, n))
    scale = 1.0 / np.sqrt(n)
    best, best_loss, losses = (G.copy(), S.copy()), np.inf, []
    for step in range(iters + 1):
        Z, saved = _forward(Z0, B64[:-1], G[:-1], S[:-1], P[:-1]) if d > 1 else (Z0, [])
        c = (fwht(B64[-1] * Z) * scale)[:, P[-1]]
        f = fwht(G[-1] * c) * scale
        S[-1] = _last_s(T, f, N)
        R = S[-1] * f
        R[:, :N] -= T
        loss = float(np.sum(R * R)) / tnorm
        losses.append(loss)
        if loss < best_loss:
            best, best_loss = (G.copy(), S.copy()), loss
        if step == iters:
            break
        # Backpropagation of L (times tnorm / 2) from the last block down to G_1.
        gG, gS = np.zeros((d, n)), np.zeros((d, n))
        saved.append((c, f))
        dZ = R
        for t in range(d - 1, -1, -1):
            c_t, f_t = saved[t]
            if t < d - 1:
                gS[t] = np.einsum("mj,mj->j", dZ, f_t)
            de = fwht(dZ * S[t]) * scale
            gG[t] = np.einsum("mj,mj->j", de, c_t)
            if t == 0:
                break
            db = np.empty_like(de)
            db[:, P[t]] = de * G[t]
            dZ = fwht(db) * scale * B64[t]
        # Adam on (G, S[:-1]), gradients scaled to L itself.
        grads = np.stack((gG, gS)) * (2.0 / tnorm)
        m1 = 0.9 * m1 + 0.1 * grads
        m2 = 0.999 * m2 + 0.001 * grads * grads
        k = step + 1
        upd = LR * (m1 / (1 - 0.9**k)) / (np.sqrt(m2 / (1 - 0.999**k)) + 1e-12)
        G -= upd[0]
        S[:-1] -= upd[1][:-1]
    G, S = best
    S = S / n  # the op's H is unnormalised: two factors sqrt(n) per block
    return B, G.astype(np.float32), S.astype(np.float32), P, losses


def relative_error(X: np.ndarray, W: np.ndarray, bias: np.ndarray | None, B, G, S, P) -> float:
    """||X W - X V|| / ||X W + bias|| on rows X [M, K] (V the stack, truncated to N outputs)."""
    Y = X.astype(np.float64) @ W.astype(np.float64)
    K, N = W.shape
    V = fastfood_matmul(X.astype(np.float64), B, G, S, P, None, K, N)
    ref = Y + (0.0 if bias is None else bias.astype(np.float64))
    return float(np.linalg.norm(Y - V) / max(np.linalg.norm(ref), 1e-30))


def fit(
    W: np.ndarray, X: np.ndarray | None, bias: np.ndarray | None, d: int, iters: int = ITERS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """(B, G, S, P, estimated error) of a depth-d stack for W (K x N) on calibration rows X (or Gaussian rows
    when None or too few); the error is measured on held-out rows."""
    K, N = W.shape
    n = padded_size(K, N)
    if X is None or len(X) < MIN_ROWS:
        X = np.random.default_rng(SEED + 1).standard_normal((2 * MAX_FIT_ROWS, K))
    X = X.astype(np.float64)
    train, held = X[0::2][:MAX_FIT_ROWS], X[1::2][:MAX_FIT_ROWS]
    per_step = 4 * d * len(train) * n * np.log2(n)
    iters = min(iters, max(MIN_ITERS, int(WORK / per_step)))
    B, G, S, P, _ = fit_stack(train, train @ W.astype(np.float64), d, n, iters)
    return B, G, S, P, relative_error(held, W, bias, B, G, S, P)


class Fastfood(Pass):
    name = "fastfood"
    op_types = ("Gemm", "MatMul")
    lossy = True
    default = False
    summary = "Gemm/MatMul -> FastfoodMatMul (stacked S H G Pi H B blocks, fast Walsh-Hadamard custom op)"
    custom_ops = ("FastfoodMatMul",)

    def check(self, node: gs.Node, ctx: PassContext) -> str | None:
        if problem := structured_problem(node, ctx, MIN_DIM):
            return problem
        K, N = dense_kn(node)
        if padded_size(K, N) > MAX_N:
            return f"weight {K}x{N} is too large (padded size above {MAX_N})"
        return None

    def activations_needed(self, node: gs.Node) -> list[str]:
        return [node.inputs[0].name]

    def options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        W, bias, X = dense_layer(node, ctx)
        K, N = W.shape
        n = padded_size(K, N)
        fixed = ctx.setting("depth", int)
        iters = ctx.setting("iters", int, ITERS)
        depths = [fixed] if fixed is not None else list(DEPTHS)
        rows = int(np.prod(ctx.shapes.get(node.outputs[0].name, (1, N))[:-1]))
        options, tried = [], []
        for d in depths:
            if d < 1:
                raise Decline(f"depth {d} must be >= 1")
            params = 4 * n * d + (N if bias is not None else 0)
            if 20 * n * d >= 4 * K * N:
                tried.append(f"d={d}: no gain")
                continue
            B, G, S, P, err = fit(W, X, bias, d, iters)
            tried.append(f"d={d}: {err:.3g}")
            if err > ctx.local_tolerance:
                continue
            load = ctx.park(B, G, S, P)
            options.append(
                Option(
                    est_error=err,
                    params_after=params,
                    bytes_after=20 * n * d + (4 * N if bias is not None else 0),
                    flops_after=int(rows * d * (2 * n * np.log2(n) + 3 * n)),
                    emit=self._emitter(load, K, N, bias),
                    detail={"depth": d, "shape": [K, N], "n": n},
                )
            )
            break  # deeper stacks only cost more: the shallowest depth that fits is the option
        if not options:
            raise Decline(
                f"no Fastfood depth fits the tolerance {ctx.local_tolerance:g}: estimated errors "
                + ", ".join(tried)
                + " (the layer is not close to a Fastfood stack)"
            )
        return options

    def _emitter(self, load, K: int, N: int, bias: np.ndarray | None):
        def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
            B, G, S, P = load()
            inputs = [node.inputs[0]] + [
                gs.Constant(new_name(prefix, name), value)
                for name, value in zip("BGSP", (B, G, S, P), strict=True)
            ]
            if bias is not None:
                inputs.append(gs.Constant(new_name(prefix, "bias"), bias.astype(np.float32)))
            new = gs.Node(
                "FastfoodMatMul",
                new_name(prefix, "fastfood"),
                attrs={"in_features": K, "out_features": N},
                inputs=inputs,
                outputs=[node.outputs[0]],
                domain=DOMAIN,
            )
            return replace_node(graph, node, [new])

        return emit
