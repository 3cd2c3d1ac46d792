"""circulant: a Gemm or MatMul with a constant weight W (K x N, y = x W + b) becomes a CirculantMatMul whose
weight is block-circulant (Cheng et al., ICCV 2015: y = ifft(fft(v) . fft(D x)), here in blocks).

Structure. K and N are zero-padded up to multiples of the block size b (a power of two); then
W ≈ D P with D = diag(s), s in {+1, -1}^K a fixed seeded random sign flip (it decorrelates the rows, so a
trained W that has structure along K is not fitted systematically worse), and P a (K/b) x (N/b) grid of
b x b circulant blocks circ(c_ij)[m, n] = c_ij[(m - n) mod b]. The op computes output block j as
y_j = irfft( sum_i conj(rfft(c_ij)) . rfft((D x)_i) ) (a circular correlation, onnxopt.reference.circulant).
Params K N / b (+ K signs); the full-circulant case is one block, b = the padded max(K, N).
A pointwise (1x1) Conv is the same map on every pixel: it runs channels-last between two Transposes.

Plain fit (no data). Since D^-1 = D, fit P to D W block by block: the Frobenius-nearest circulant matrix to a
b x b block A averages its wrapped diagonals, c[k] = (1/b) sum_m A[m, (m - k) mod b] (the circulants are
the span of b orthogonal permutation matrices of equal norm, and the projection onto each is that mean).

Data-aware fit (calibration rows X of the layer's input). Minimise ||X W - X D P||_F. With Z = X D in input
blocks z_i and targets t_j = (X W)_j, Parseval per output block j and per rfft bin f turns it into
independent small complex least squares over the input blocks i:
    min_a  sum_rows | T_j[f] - sum_i Z_i[f] a_i |^2,      a_i = conj(rfft(c_ij))[f]
solved by the normal equations (Z[f]^H Z[f] + lam I) a = Z[f]^H T_j[f] + lam a_plain (ridge toward the plain
fit, so directions the calibration rows never visit keep the weight's own values). Bins 0 and b/2 are real
for real data, so their solutions are real; the other bins stand for themselves and their mirror images.

Estimated error: relative to ||X W + b||_F on held-out calibration rows (every other row; the fit sees the
rest), of the plain or data-aware fit, whichever is lower; without calibration data ||W - D P|| / ||W||.
Most trained layers are NOT close to block-circulant: the budget then declines or undoes the rewrite, which
is the expected outcome, reported with the error it would have cost.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import DOMAIN
from onnxopt.passes.dense import (
    channels_last,
    dense_layer,
    output_rows,
    pad_last_axis,
    structured_problem,
)
from onnxopt.reference.circulant import circulant_matmul
from onnxopt.rewrite import (
    Decline,
    Option,
    Pass,
    PassContext,
    new_name,
    replace_node,
)

MIN_DIM = 64  # K and N at least this: smaller layers gain nothing worth an FFT
MAX_BLOCK = 4096
MIN_BLOCK = 16
MAX_FIT_ROWS = 2048  # calibration rows used per fit (and as many held out)
RIDGE = 1e-3  # of the mean diagonal of Z[f]^H Z[f], per bin
SIGN_SEED = 0


def block_sizes(K: int, N: int) -> list[int]:
    """Candidate block sizes, largest (most compressive) first: powers of two from min(MAX_BLOCK, the padded
    max(K, N)) down to MIN_BLOCK."""
    top = min(MAX_BLOCK, 1 << (max(K, N) - 1).bit_length())
    return [b for b in (1 << e for e in range(top.bit_length() - 1, -1, -1)) if b >= MIN_BLOCK]


def padded(n: int, b: int) -> int:
    """n rounded up to a multiple of b."""
    return -(-n // b) * b


def signs(K: int, seed: int = SIGN_SEED) -> np.ndarray:
    """The fixed random sign flip s in {+1, -1}^K (float32)."""
    return np.random.default_rng(seed).choice(np.array([-1.0, 1.0], np.float32), K)


def pad_weight(W: np.ndarray, b: int) -> np.ndarray:
    """W zero-padded to (K', N'), multiples of b."""
    K, N = W.shape
    out = np.zeros((padded(K, b), padded(N, b)), W.dtype)
    out[:K, :N] = W
    return out


def project(A: np.ndarray, b: int) -> np.ndarray:
    """C [K/b, N/b, b]: the Frobenius-nearest block-circulant matrix to A (K, N multiples of b): per block the
    mean of each wrapped diagonal, c[k] = mean_m A_block[m, (m - k) mod b]."""
    K, N = A.shape
    blocks = A.reshape(K // b, b, N // b, b).transpose(0, 2, 1, 3).astype(np.float64)  # [kb, nb, m, n]
    m = np.arange(b)
    C = np.stack([blocks[:, :, m, (m - k) % b].mean(axis=-1) for k in range(b)], axis=-1)
    return C.astype(np.float32)


def expand(C: np.ndarray) -> np.ndarray:
    """P as a dense matrix from its first columns C [kb, nb, b] (float64)."""
    kb, nb, b = C.shape
    m, n = np.meshgrid(np.arange(b), np.arange(b), indexing="ij")
    return C.astype(np.float64)[:, :, (m - n) % b].transpose(0, 2, 1, 3).reshape(kb * b, nb * b)


def fit_plain(W: np.ndarray, s: np.ndarray, b: int) -> np.ndarray:
    """C of the plain fit: W (K', N' padded) ≈ D P, so P is the projection of D W."""
    return project(s[:, None] * W, b)


def fit_data(W: np.ndarray, s: np.ndarray, b: int, X: np.ndarray, C0: np.ndarray) -> np.ndarray:
    """C of the data-aware fit (module doc): per rfft bin, a ridge least squares over the input blocks."""
    K, N = W.shape
    kb, nb = K // b, N // b
    Zf = np.fft.rfft((X.astype(np.float64) * s).reshape(len(X), kb, b), axis=-1)  # [M, kb, F]
    Tf = np.fft.rfft((X.astype(np.float64) @ W.astype(np.float64)).reshape(len(X), nb, b), axis=-1)
    G = np.einsum("mif,mkf->fik", Zf.conj(), Zf)  # [F, kb, kb] Z^H Z
    lam = RIDGE * np.maximum(np.einsum("fii->f", G).real / kb, 1e-30)
    A0 = np.conj(np.fft.rfft(C0.astype(np.float64), axis=-1))  # [kb, nb, F]: a_i of the plain fit
    rhs = np.einsum("mif,mjf->fij", Zf.conj(), Tf) + lam[:, None, None] * A0.transpose(2, 0, 1)
    A = np.linalg.solve(G + lam[:, None, None] * np.eye(kb), rhs)  # [F, kb, nb]
    return np.fft.irfft(np.conj(A.transpose(1, 2, 0)), n=b, axis=-1).astype(np.float32)


def relative_error(
    W: np.ndarray, C: np.ndarray, s: np.ndarray, X: np.ndarray | None, bias: np.ndarray | None
) -> float:
    """||X W - X D P|| / ||X W + bias|| on rows X (or ||W - D P|| / ||W|| without them); W padded like C."""
    if X is None:
        return float(np.linalg.norm(W - s[:, None] * expand(C)) / max(np.linalg.norm(W), 1e-30))
    Y = X.astype(np.float64) @ W.astype(np.float64)
    diff = np.linalg.norm(Y - circulant_matmul(X.astype(np.float64), C.astype(np.float64), s))
    ref = Y + (0.0 if bias is None else np.pad(bias, (0, W.shape[1] - len(bias))))
    return float(diff / max(np.linalg.norm(ref), 1e-30))


def fit(
    W: np.ndarray, X: np.ndarray | None, bias: np.ndarray | None, b: int, data_aware: bool = True
) -> tuple[str, np.ndarray, np.ndarray, float]:
    """(kind, C, s, estimated error) for block size b; W is K x N unpadded, X rows of K (or None)."""
    K = W.shape[0]
    Wp = pad_weight(W.astype(np.float32), b)
    s = signs(Wp.shape[0])
    C = fit_plain(Wp, s, b)
    if X is None or len(X) < 4:
        return "plain", C, s, relative_error(Wp, C, s, None, None)
    Xp = np.zeros((len(X), Wp.shape[0]), np.float32)
    Xp[:, :K] = X
    train, held = Xp[0::2][:MAX_FIT_ROWS], Xp[1::2][:MAX_FIT_ROWS]
    err = relative_error(Wp, C, s, held, bias)
    if data_aware and len(train) >= 2:
        Cd = fit_data(Wp, s, b, train, C)
        err_d = relative_error(Wp, Cd, s, held, bias)
        if err_d < err:
            return "data-aware", Cd, s, err_d
    return "plain", C, s, err


class Circulant(Pass):
    name = "circulant"
    op_types = ("Gemm", "MatMul", "Conv")
    lossy = True
    default = False
    summary = "Gemm/MatMul/1x1 Conv -> CirculantMatMul (block-circulant weight with sign flip, FFT custom op)"
    custom_ops = ("CirculantMatMul",)

    def check(self, node: gs.Node, ctx: PassContext) -> str | None:
        if problem := structured_problem(node, ctx, MIN_DIM):
            return problem
        if ctx.shapes.get(node.inputs[0].name) is None:
            return "input shape unknown (its rank is needed to pad K)"
        return None

    def activations_needed(self, node: gs.Node) -> list[str]:
        return [node.inputs[0].name]

    def options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        W, bias, X = dense_layer(node, ctx)
        K, N = W.shape
        data_aware = ctx.setting("data_aware", lambda v: v.lower() not in ("0", "false", "no"), True)
        fixed = ctx.setting("block", int)
        sizes = [fixed] if fixed is not None else block_sizes(K, N)
        rank = len(ctx.shapes[node.inputs[0].name])
        rows = output_rows(node, ctx, N)
        options, tried = [], []
        for b in sizes:
            if b < 2 or b & (b - 1):
                raise Decline(f"block {b} is not a power of two >= 2")
            kind, C, s, err = fit(W, X, bias, b, data_aware)
            tried.append(f"b={b}: {err:.3g}")
            if err > ctx.local_tolerance:
                continue
            Kp, Np = padded(K, b), padded(N, b)
            params = Kp * Np // b + Kp + (Np if bias is not None else 0)
            load = ctx.park(C, s)
            fft = 2.5 * b * np.log2(b)
            flops = int(rows * ((Kp + Np) // b * fft + 8 * (Kp // b) * (Np // b) * (b // 2 + 1)))
            options.append(
                Option(
                    est_error=err,
                    params_after=params,
                    bytes_after=4 * params,
                    flops_after=flops,
                    emit=self._emitter(load, b, K, N, bias, rank),
                    detail={"block": b, "shape": [K, N], "padded": [Kp, Np], "fit": kind},
                )
            )
        if not options:
            raise Decline(
                f"no block size fits the tolerance {ctx.local_tolerance:g}: estimated errors "
                + ", ".join(tried)
                + " (the layer is not close to block-circulant)"
            )
        return options

    def _emitter(self, load, b: int, K: int, N: int, bias: np.ndarray | None, rank: int):
        def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
            C, s = load()
            Kp, Np = s.shape[0], C.shape[1] * b
            x, y, nodes, tail = channels_last(node, prefix)
            x, pad = pad_last_axis(x, Kp - K, rank, prefix)
            nodes += pad
            inputs = [x, gs.Constant(new_name(prefix, "C"), C), gs.Constant(new_name(prefix, "S"), s)]
            if bias is not None:
                inputs.append(
                    gs.Constant(new_name(prefix, "B"), np.pad(bias, (0, Np - N)).astype(np.float32))
                )
            out = y if Np == N else gs.Variable(new_name(prefix, "y_padded"), dtype=np.float32)
            nodes.append(
                gs.Node(
                    "CirculantMatMul",
                    new_name(prefix, "circulant"),
                    attrs={"block": b},
                    inputs=inputs,
                    outputs=[out],
                    domain=DOMAIN,
                )
            )
            if Np != N:  # the padded output columns are dropped
                const = [
                    gs.Constant(new_name(prefix, n), np.array([v], np.int64))
                    for n, v in (("starts", 0), ("ends", N), ("axes", -1))
                ]
                nodes.append(gs.Node("Slice", new_name(prefix, "crop"), inputs=[out, *const], outputs=[y]))
            return replace_node(graph, node, nodes + tail)

        return emit
