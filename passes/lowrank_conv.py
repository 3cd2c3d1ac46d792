"""lowrank for Conv: a kh x kw convolution W [M, C, kh, kw] (group 1) becomes a chain of cheaper Convs.

On the input patch p under an output position (its C·kh·kw values), Conv is y = A p + b with A = W reshaped to
M x (C kh kw). Three factorizations, each a chain of standard Conv nodes:

- channel: A ≈ P Q of rank r: a Conv with r filters Q [r, C, kh, kw] (the layer's strides, pads and
  dilations), then a 1x1 Conv P [M, r] with the bias. On the patches this is lowrank's Gemm case with
  W = A^T, so its fits (plain, or data-aware on the calibration patches) and error estimates apply as they
  are. Parameters r (C kh kw + M).
- spatial (Jaderberg et al., scheme 2): W~[(c, i), (m, j)] = W[m, c, i, j] ≈ U V of rank r: a kh x 1 Conv with
  r filters V[r, c, i] (the vertical stride, pads and dilation), then a 1 x kw Conv H[m, r, j] (the horizontal
  ones) with the bias. Parameters r (C kh + M kw).
- tucker (Tucker-2, by HOSVD): W ≈ G x_M U_out x_C U_in, U_out [M, r_out] and U_in [C, r_in] the leading left
  singular vectors of W unfolded along M and along C, G = W x_M U_out^T x_C U_in^T: a 1x1 Conv C -> r_in, the
  kh x kw core Conv r_in -> r_out (strides, pads, dilations), a 1x1 Conv r_out -> M with the bias.
  Parameters C r_in + r_in r_out kh kw + r_out M.

Errors are the relative L2 error of the layer's output on calibration patches the fits did not see,
||p (A - Â)^T|| / ||p A^T + b|| over rows p; without calibration data, ||W - Ŵ|| / ||W||. Options keep only
what cuts both parameters and FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.lowrank import MAX_ROWS, fit, max_useful_rank, split, tolerance_ladder
from onnxopt.rewrite import LOCAL_SLACK, Decline, Option, PassContext, constant_value, new_name, replace_node

ERROR_ROWS = 2048  # held-out patches the spatial and tucker errors are measured on


@dataclass(frozen=True)
class ConvGeometry:
    """What a Conv node computes, with its attributes made explicit."""

    M: int
    C: int
    kh: int
    kw: int
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilations: tuple[int, int]

    @property
    def patch(self) -> int:
        return self.C * self.kh * self.kw


def geometry(W_shape: tuple[int, ...], attrs: dict) -> ConvGeometry:
    M, C, kh, kw = (int(d) for d in W_shape)
    pads = [0, 0, 0, 0] if attrs.get("auto_pad", "NOTSET") == "VALID" else attrs.get("pads", [0, 0, 0, 0])
    return ConvGeometry(
        M,
        C,
        kh,
        kw,
        tuple(int(s) for s in attrs.get("strides", [1, 1])),
        tuple(int(p) for p in pads),
        tuple(int(d) for d in attrs.get("dilations", [1, 1])),
    )


def patches(X: np.ndarray, g: ConvGeometry, max_rows: int, seed: int = 0) -> np.ndarray:
    """The input patches of the convolution as rows (n, C kh kw), ordered like W's (c, i, j), at most max_rows
    of them (a seeded sample of positions across the calibration images)."""
    t, left, b, r = g.pads
    Xp = np.pad(X.astype(np.float32, copy=False), ((0, 0), (0, 0), (t, b), (left, r)))
    dh, dw = g.dilations
    span = ((g.kh - 1) * dh + 1, (g.kw - 1) * dw + 1)
    win = np.lib.stride_tricks.sliding_window_view(Xp, span, axis=(2, 3))  # [N, C, OH', OW', sh', sw']
    win = win[:, :, :: g.strides[0], :: g.strides[1], ::dh, ::dw]  # [N, C, OH, OW, kh, kw]
    N, C, OH, OW = win.shape[:4]
    total = N * OH * OW
    pick = np.arange(total)
    if total > max_rows:
        pick = np.sort(np.random.default_rng(seed).choice(total, max_rows, replace=False))
    n, rest = np.divmod(pick, OH * OW)
    oy, ox = np.divmod(rest, OW)
    return win[n, :, oy, ox].reshape(len(pick), C * g.kh * g.kw)


def output_error(P: np.ndarray | None, A: np.ndarray, A_hat: np.ndarray, bias: np.ndarray | None) -> float:
    """Relative L2 error of the layer's output on patches P (rows) when A becomes A_hat; on A without P."""
    if P is None:
        return float(np.linalg.norm(A - A_hat) / max(np.linalg.norm(A), 1e-30))
    Y = P @ A.T
    if bias is not None:
        Y = Y + bias
    return float(np.linalg.norm(P @ (A - A_hat).T) / max(np.linalg.norm(Y), 1e-30))


def rank_grid(r_max: int) -> list[int]:
    """Ranks to try: 1, 2, 3, 4, 6, 8, 12, 16, ... (two per octave) up to r_max."""
    grid, r = [], 1
    while r <= r_max:
        grid.append(r)
        r2 = r * 3 // 2
        if r2 <= r_max and r2 > r:
            grid.append(r2)
        r *= 2
    return sorted(set(grid))


# ------------------------------------------------------------------------------------------- spatial


def spatial_svd(W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD of W~ [(c, i), (m, j)] = W[m, c, i, j]."""
    M, C, kh, kw = W.shape
    Wt = W.transpose(1, 2, 0, 3).reshape(C * kh, M * kw)
    return np.linalg.svd(Wt.astype(np.float32), full_matrices=False)


def spatial_factors(svd: tuple, shape: tuple[int, ...], r: int) -> tuple[np.ndarray, np.ndarray]:
    """(vertical [r, C, kh, 1], horizontal [M, r, 1, kw]) filters of rank r."""
    M, C, kh, kw = shape
    U, s, Vt = svd
    root = np.sqrt(s[:r])
    vertical = (U[:, :r] * root).T.reshape(r, C, kh, 1)
    horizontal = (root[:, None] * Vt[:r]).reshape(r, M, 1, kw).transpose(1, 0, 2, 3)
    return vertical.astype(np.float32), np.ascontiguousarray(horizontal, dtype=np.float32)


def spatial_weight(vertical: np.ndarray, horizontal: np.ndarray) -> np.ndarray:
    """W[m, c, i, j] = sum_r horizontal[m, r, 0, j] vertical[r, c, i, 0]."""
    return np.einsum("mrj,rci->mcij", horizontal[:, :, 0, :], vertical[:, :, :, 0], optimize=True)


# -------------------------------------------------------------------------------------------- tucker


def tucker_bases(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors of W's unfoldings along M ([M, M]) and along C ([C, C]), leading first."""
    M, C = W.shape[:2]
    U_out = np.linalg.svd(W.reshape(M, -1).astype(np.float32), full_matrices=False)[0]
    U_in = np.linalg.svd(W.transpose(1, 0, 2, 3).reshape(C, -1).astype(np.float32), full_matrices=False)[0]
    return U_out, U_in


def tucker_factors(W: np.ndarray, bases: tuple, r_out: int, r_in: int) -> tuple[np.ndarray, ...]:
    """(first [r_in, C, 1, 1], core [r_out, r_in, kh, kw], last [M, r_out, 1, 1]) of Tucker-2 ranks."""
    U_out, U_in = bases[0][:, :r_out], bases[1][:, :r_in]
    core = np.einsum("mcij,mo,cn->onij", W, U_out, U_in, optimize=True)
    return (
        np.ascontiguousarray(U_in.T[:, :, None, None], dtype=np.float32),
        core.astype(np.float32),
        np.ascontiguousarray(U_out[:, :, None, None], dtype=np.float32),
    )


def tucker_weight(first: np.ndarray, core: np.ndarray, last: np.ndarray) -> np.ndarray:
    return np.einsum("mo,onij,nc->mcij", last[:, :, 0, 0], core, first[:, :, 0, 0], optimize=True)


def tucker_ranks(M: int, C: int) -> list[tuple[int, int]]:
    """(r_out, r_in) pairs keeping the same fraction of both channel counts, from 1/16 to 3/4."""
    pairs = []
    for f in (1 / 16, 1 / 12, 1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 3 / 4):
        pairs.append((max(1, math.ceil(f * M)), max(1, math.ceil(f * C))))
    return sorted(set(pairs))


# ------------------------------------------------------------------------------------------- emitters


def _conv(prefix: str, what: str, x: gs.Tensor, weight: np.ndarray, out: gs.Tensor, bias=None, **attrs):
    inputs = [x, gs.Constant(new_name(prefix, f"{what}_w"), weight)] + ([bias] if bias is not None else [])
    kernel = list(weight.shape[2:])
    return gs.Node(
        "Conv", new_name(prefix, what), attrs={"kernel_shape": kernel, **attrs}, inputs=inputs, outputs=[out]
    )


def chain_emitter(build: Callable[[], list[tuple[np.ndarray, dict]]]):
    """An emit for a chain of Convs: build() returns (weight, attributes) per Conv, first to last; the last
    takes the original bias and output."""

    def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
        steps = build()
        x, y = node.inputs[0], node.outputs[0]
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        nodes = []
        for i, (weight, attrs) in enumerate(steps):
            last = i == len(steps) - 1
            out = y if last else gs.Variable(new_name(prefix, f"mid{i}"), dtype=np.float32)
            nodes.append(_conv(prefix, f"conv{i}", x, weight, out, bias if last else None, **attrs))
            x = out
        return replace_node(graph, node, nodes)

    return emit


def layer_attrs(g: ConvGeometry) -> dict:
    return {"strides": list(g.strides), "pads": list(g.pads), "dilations": list(g.dilations)}


def vertical_attrs(g: ConvGeometry) -> dict:
    t, _, b, _ = g.pads
    return {"strides": [g.strides[0], 1], "pads": [t, 0, b, 0], "dilations": [g.dilations[0], 1]}


def horizontal_attrs(g: ConvGeometry) -> dict:
    _, left, _, r = g.pads
    return {"strides": [1, g.strides[1]], "pads": [0, left, 0, r], "dilations": [1, g.dilations[1]]}


ONE_BY_ONE = {"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1]}


# ---------------------------------------------------------------------------------------------- the pass


def conv_check(node: gs.Node, ctx: PassContext) -> str | None:
    """Why lowrank cannot take this Conv (its weight is already known to be a constant float32)."""
    shape = tuple(node.inputs[1].shape)
    if len(shape) != 4:
        return f"weight has rank {len(shape)}, not a 2-D convolution"
    if ctx.consumers.get(node.inputs[1].name, 0) > 1:
        return "weight initializer is shared with other nodes"
    if node.attrs.get("group", 1) != 1:
        return f"group={node.attrs['group']}: grouped convolutions are not factorized"
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"auto_pad={node.attrs['auto_pad']} is not supported (explicit pads only)"
    if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
        return "bias is not constant"
    x = ctx.shapes.get(node.inputs[0].name)
    if x is not None and len(x) != 4:
        return f"input has rank {len(x)}, not 4"
    M, C, kh, kw = shape
    if max_useful_rank(C * kh * kw, M) < 1:
        return f"weight {list(shape)} is too small for a factorization to pay off"
    return None


@dataclass(frozen=True)
class Sizes:
    """Positions the FLOPs are counted over: input N x H x W, output N x OH x OW."""

    n: int
    h: int
    w: int
    oh: int
    ow: int

    @property
    def outputs(self) -> int:
        return self.n * self.oh * self.ow


@dataclass
class _Candidate:
    scheme: str
    params: int  # weights only (the bias is added by the caller)
    flops: int
    error: float
    build: Callable[[], list[tuple[np.ndarray, dict]]]
    detail: dict


def conv_options(node: gs.Node, ctx: PassContext) -> list[Option]:
    """lowrank's options for a Conv: the fewest-parameter factorization within each tolerance."""
    g = geometry(tuple(node.inputs[1].shape), node.attrs)
    x_shape, y_shape = ctx.shapes.get(node.inputs[0].name), ctx.shapes.get(node.outputs[0].name)
    if not x_shape or not y_shape:
        raise Decline("input or output shape unknown: the cost of a factorization cannot be counted")
    sizes = Sizes(x_shape[0], x_shape[2], x_shape[3], y_shape[2], y_shape[3])
    W = constant_value(node.inputs[1]).astype(np.float32, copy=False)
    has_bias = len(node.inputs) > 2 and bool(node.inputs[2].name)
    bias = constant_value(node.inputs[2]).astype(np.float32).reshape(-1) if has_bias else None
    X = ctx.activations.get(node.inputs[0].name)
    P = patches(X, g, MAX_ROWS) if X is not None else None
    held_out = P[1::2][:ERROR_ROWS] if P is not None and len(P) >= 4 else None
    schemes = ctx.setting("schemes", lambda v: set(v.split("+")), {"channel", "spatial", "tucker"})
    fixed_rank = ctx.setting("rank", int) is not None

    found: list[_Candidate] = []
    if "channel" in schemes:
        found += _channel(g, W, P, bias, sizes, ctx)
    if "spatial" in schemes and g.kh > 1 and g.kw > 1 and not fixed_rank:
        found += _spatial(g, W, held_out, bias, sizes)
    if "tucker" in schemes and g.kh * g.kw > 1 and not fixed_rank:
        found += _tucker(g, W, held_out, bias, sizes)
    params_before, flops_before = g.M * g.patch, 2 * sizes.outputs * g.M * g.patch
    found = [c for c in found if c.params < params_before and c.flops < flops_before]
    chosen = found if fixed_rank else _ladder(found, ctx.local_tolerance)
    if not chosen:
        best = min((c.error for c in found), default=float("nan"))
        raise Decline(
            f"no factorization that cuts parameters and FLOPs fits {ctx.local_tolerance:g} "
            f"({LOCAL_SLACK:g}x the budget); best estimated error {best:.3g}"
        )
    extra = g.M if has_bias else 0
    return [
        Option(
            est_error=c.error,
            params_after=c.params + extra,
            bytes_after=4 * (c.params + extra),
            flops_after=c.flops,
            emit=chain_emitter(c.build),
            detail={"scheme": c.scheme, **c.detail},
        )
        for c in chosen
    ]


def _ladder(found: list[_Candidate], tol: float) -> list[_Candidate]:
    """For each tolerance of the ladder, the candidate with the fewest parameters within it; most compressive
    first."""
    chosen: list[_Candidate] = []
    for t in tolerance_ladder(tol):
        fits = [c for c in found if c.error <= t]
        if fits:
            best = min(fits, key=lambda c: (c.params, c.error))
            if best not in chosen:
                chosen.append(best)
    return sorted(chosen, key=lambda c: c.params)


def _channel(g: ConvGeometry, W, P, bias, sizes: Sizes, ctx: PassContext) -> list[_Candidate]:
    """Every rank of the channel scheme with its error (the Gemm fit on the patches), as candidates."""
    A = W.reshape(g.M, -1)
    r_max = min(max_useful_rank(g.patch, g.M), g.patch, g.M)
    data_aware = ctx.setting("data_aware", lambda v: v.lower() not in ("0", "false", "no"), True)
    kind, factors, err = fit(A.T, P, bias, ctx.local_tolerance, r_max, data_aware)
    fixed = ctx.setting("rank", int)
    if fixed is not None and not 1 <= fixed <= r_max:
        raise Decline(
            f"rank {fixed} does not pay off for a {g.M}x{g.patch} filter bank (1 <= rank <= {r_max})"
        )
    ranks = [fixed] if fixed is not None else rank_grid(r_max)
    top = max(ranks)
    load = ctx.park(factors[0][:, :top], factors[1][:top], factors[2][:top])

    def build(r: int):
        def steps():
            U, V = split(*load(), r)  # A^T ≈ U V: U [patch, r], V [r, M]
            first = np.ascontiguousarray(U.T.reshape(r, g.C, g.kh, g.kw))
            last = np.ascontiguousarray(V.T[:, :, None, None])
            return [(first, layer_attrs(g)), (last, ONE_BY_ONE)]

        return steps

    per_output = g.patch + g.M
    return [
        _Candidate(
            "channel",
            r * per_output,
            2 * sizes.outputs * r * per_output,
            float(err[r]),
            build(r),
            {"rank": r, "fit": kind},
        )
        for r in ranks
    ]


def _spatial(g: ConvGeometry, W, P, bias, sizes: Sizes) -> list[_Candidate]:
    svd = spatial_svd(W)
    r_max = min((g.M * g.patch - 1) // (g.C * g.kh + g.M * g.kw), len(svd[1]))
    mid = sizes.n * sizes.oh * sizes.w  # the vertical Conv's outputs: every input column
    found = []
    for r in rank_grid(r_max):
        vertical, horizontal = spatial_factors(svd, W.shape, r)
        err = output_error(P, W.reshape(g.M, -1), spatial_weight(vertical, horizontal).reshape(g.M, -1), bias)
        flops = 2 * (mid * r * g.C * g.kh + sizes.outputs * g.M * r * g.kw)
        steps = [(vertical, vertical_attrs(g)), (horizontal, horizontal_attrs(g))]
        found.append(
            _Candidate("spatial", r * (g.C * g.kh + g.M * g.kw), flops, err, _fixed(steps), {"rank": r})
        )
    return found


def _tucker(g: ConvGeometry, W, P, bias, sizes: Sizes) -> list[_Candidate]:
    bases = tucker_bases(W)
    found = []
    for r_out, r_in in tucker_ranks(g.M, g.C):
        first, core, last = tucker_factors(W, bases, r_out, r_in)
        err = output_error(P, W.reshape(g.M, -1), tucker_weight(first, core, last).reshape(g.M, -1), bias)
        params = g.C * r_in + r_in * r_out * g.kh * g.kw + r_out * g.M
        k = g.kh * g.kw
        flops = 2 * (
            sizes.n * sizes.h * sizes.w * g.C * r_in + sizes.outputs * (r_in * r_out * k + r_out * g.M)
        )
        steps = [(first, ONE_BY_ONE), (core, layer_attrs(g)), (last, ONE_BY_ONE)]
        found.append(_Candidate("tucker", params, flops, err, _fixed(steps), {"ranks": [r_out, r_in]}))
    return found


def _fixed(steps: list[tuple[np.ndarray, dict]]) -> Callable[[], list[tuple[np.ndarray, dict]]]:
    return lambda: steps
