"""sparse_basis: a Conv's filters as sparse combinations of a few basis filters (Liu et al., CVPR 2015),
fitted on calibration data without retraining.

A Conv (group 1, kernel larger than 1x1) with weight W [N, C, kh, kw] is, on each input patch p (C kh kw
values), y = A p + b with A = W reshaped to N x K, K = C kh kw. It becomes A ≈ S D (sparse_basis_fit.py has
the math: a weighted SVD for the basis, OMP-like hard thresholding with exact least-squares re-fits for the
coefficients, basis updates by the method of optimal directions, all in the metric of the calibration
patches' second moments, so the layer's output on calibration data is what is kept):

    Z = Conv(X, D)                      the basis conv: the layer's strides, pads and dilations, no bias
    Y = SparseConv1x1(Z, S) + b         the combination: CSR of S (onnxopt's SparseConv, 1x1 path), or a
                                        dense 1x1 Conv where S is too dense for the sparse kernel to pay

in one of Liu et al.'s two forms (`sparse_basis.form=both|shared|channel`, default both, the budget picks):
- shared (inter-channel) basis: D [B, C, kh, kw], B < N filters over all input channels, S [N, B]; fitted
  by dictionary learning (sparse_basis_fit.fit). Its basis holds B C kh kw weights and S only N B, so S's
  sparsity saves little: this form is mostly a low-rank factorization.
- channel (intra-channel) basis: per input channel c, q < kh kw kernels of its own (a grouped Conv, groups =
  C, C q outputs, D [C q, 1, kh, kw]), S [N, C q]: the basis is tiny and S is where the weights are, so its
  sparsity pays in size (sparse_basis_fit.channel_basis, fit_basis). Liu et al.'s 1x1 channel-mixing
  transform before the basis (a PCA of the input channels) is not emitted. onnxruntime runs the grouped
  conv far below its dense speed on this CPU (a depthwise-like kernel), so this form buys size, rarely time.

Options: every (form, basis size, density of S) on a grid (shared: B on lowrank's grid below N; channel: q
below kh kw; densities DENSITIES), each fitted and its error estimated on held-out calibration patches, ||P
(A - S D)^T|| / ||P A^T + b||; only options that save both bytes and FLOPs of what is emitted are kept (the
basis conv dense, the CSR at 8 bytes and 2 FLOPs per nonzero, or the dense 1x1), and only those on the
Pareto front of (bytes, error), most compressive first. Without calibration data the metric is the identity
(weight error).

Settings: `sparse_basis.sparse=auto|0|1` (auto: densities up to 1 - SPARSE_AT run as SparseConv, where the
1x1 sparse kernel measured faster than dense (BENCHMARKS.md), and the dense 1x1 is offered with every
coefficient kept, S dense (a rank-B factorization); 1: every density sparse; 0: every density as a dense 1x1
holding S's zeros, standard ONNX that is smaller only once the file is compressed, as prune's sparse=0),
`sparse_basis.basis=B` (one basis size: B filters, or q kernels per channel), `sparse_basis.density=F` (one
density), `sparse_basis.damping=D`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import DOMAIN
from onnxopt.passes import sparse_basis_fit as sbf
from onnxopt.passes.convolution import explicit_pads, has_bias
from onnxopt.passes.lowrank import MAX_ROWS
from onnxopt.passes.lowrank_conv import geometry, patches, rank_grid
from onnxopt.passes.prune import FLOOR, conv_problem
from onnxopt.passes.prune_fit import csr_bytes, relative_error, to_csr
from onnxopt.rewrite import Decline, Option, Pass, PassContext, constant_value, new_name, replace_node

DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75)  # of S; with sparse=auto those under SPARSE_AT, and 1.0
SPARSE_AT = 0.7  # combinations at least this sparse run as SparseConv (prune_sparse.SPARSE_AT, same kernel)


class SparseBasis(Pass):
    name = "sparse_basis"
    op_types = ("Conv",)
    lossy = True
    default = False  # opt-in: fits every (basis size, density) pair of every Conv
    summary = (
        "Conv -> a small dense basis Conv + a sparse 1x1 combination (SparseConv), fitted on calibration data"
    )
    custom_ops = ("SparseConv",)

    def check(self, node: gs.Node, ctx: PassContext) -> str | None:
        if problem := conv_problem(node, ctx):
            return problem
        N, _, kh, kw = (int(d) for d in node.inputs[1].shape)
        if kh * kw == 1:
            return "1x1 kernel: a basis conv would be as large as the layer (prune covers 1x1 convs)"
        if N < 2:
            return f"{N} filter: no basis smaller than the filter bank"
        return None

    def activations_needed(self, node: gs.Node) -> list[str]:
        return [node.inputs[0].name]

    def options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        g = geometry(tuple(node.inputs[1].shape), node.attrs)
        N, K = g.M, g.patch
        A = constant_value(node.inputs[1]).astype(np.float32, copy=False).reshape(N, K)
        bias = constant_value(node.inputs[2]).astype(np.float32).reshape(-1) if has_bias(node) else None
        X = ctx.activations.get(node.inputs[0].name)
        P = patches(X, g, MAX_ROWS) if X is not None else None
        fit_rows, held = (P[0::2], P[1::2]) if P is not None and len(P) >= 4 else (None, None)
        layer = sbf.prepare(A, sbf.metric(fit_rows, K, ctx.setting("damping", float, sbf.DAMPING)))
        y = ctx.shapes[node.outputs[0].name]
        pixels = int(y[0] * y[2] * y[3])
        extra = N if bias is not None else 0
        before = (4 * (N * K + extra), 2 * pixels * N * K)
        mode = ctx.setting("sparse", str, "auto")
        if mode not in ("auto", "0", "1"):
            raise Decline(f"sparse_basis.sparse={mode!r} is not auto, 0 or 1")
        candidates = []
        for form, size, outputs, basis_weights in _basis_shapes(ctx, g):
            for density in _densities(ctx, mode):
                sparse = mode == "1" or (mode == "auto" and 1 - density >= SPARSE_AT)
                # in auto mode a dense 1x1 keeps every coefficient: its zeros would cost the same
                nnz = N * outputs if mode == "auto" and not sparse else max(1, round(density * N * outputs))
                comb = (csr_bytes(nnz, N), 2 * nnz) if sparse else (4 * N * outputs, 2 * N * outputs)
                cost = (4 * (basis_weights + extra) + comb[0], pixels * (2 * basis_weights + comb[1]))
                if cost[0] < before[0] and cost[1] < before[1]:
                    candidates.append((cost, form, size, nnz, sparse))
        if not candidates:
            raise Decline(f"no basis saves both bytes and FLOPs over {N} filters of {g.C} x {g.kh} x {g.kw}")
        options, best, channel_bases = [], float("inf"), {}
        for cost, form, size, nnz, sparse in sorted(candidates, key=lambda c: c[0]):
            if form == "shared":
                f = sbf.fit(layer, size, nnz)
            else:
                if size not in channel_bases:
                    channel_bases[size] = sbf.channel_basis(A, layer.H, g.C, size)
                f = sbf.fit_basis(A, layer.H, channel_bases[size], nnz)
            err = relative_error(A.T, (f.coef @ f.basis).T, held, bias)
            if err >= best:  # not on the Pareto front: a smaller option is at least as accurate
                continue
            best = err
            nnz_kept = int(np.count_nonzero(f.coef))
            options.append(
                Option(
                    est_error=err,
                    params_after=int(np.count_nonzero(f.basis)) + nnz_kept + extra,
                    bytes_after=cost[0],
                    flops_after=cost[1],
                    emit=_emitter(ctx.park(f.basis, f.coef), bias, g, form, sparse),
                    detail={
                        "form": form,
                        "basis": size,  # filters (shared) or kernels per input channel (channel)
                        "nnz": nnz_kept,
                        "density": round(nnz_kept / f.coef.size, 4),
                        "shape": [N, K],
                        "emitted": "sparse" if sparse else "dense",
                        "train_error": round(f.train_error, 5),
                    },
                )
            )
            if err <= ctx.local_tolerance * FLOOR:
                break  # larger options could not be told apart by the budget
        return options


def _basis_shapes(ctx: PassContext, g) -> list[tuple[str, int, int, int]]:
    """(form, size, basis outputs, basis weights) to try: shared bases of B filters over all channels (B
    below N, on lowrank's grid) and per-channel bases of q kernels (q below kh kw), as `form` selects."""
    form = ctx.setting("form", str, "both")
    if form not in ("both", "shared", "channel"):
        raise Decline(f"sparse_basis.form={form!r} is not both, shared or channel")
    N, K, C, taps = g.M, g.patch, g.C, g.kh * g.kw
    out = []
    if form != "channel":
        out += [("shared", B, B, B * K) for B in _bases(ctx, N, K)]
    if form != "shared":
        out += [("channel", q, C * q, C * q * taps) for q in _bases(ctx, taps, taps, low=1)]
    return out


def _bases(ctx: PassContext, N: int, K: int, low: int = 2) -> list[int]:
    fixed = ctx.setting("basis", int)
    if fixed is not None:
        return [fixed] if 1 <= fixed < min(N, K + 1) else []
    return [b for b in rank_grid(min(N - 1, K)) if b >= low]


def _densities(ctx: PassContext, mode: str) -> tuple[float, ...]:
    fixed = ctx.setting("density", float)
    if fixed is not None:
        if not 0.0 < fixed <= 1.0:
            raise Decline(f"sparse_basis.density={fixed:g} is not in (0, 1]")
        return (fixed,)
    if mode == "auto":
        return (*(d for d in DENSITIES if 1 - d >= SPARSE_AT), 1.0)
    return DENSITIES if mode == "1" else (*DENSITIES, 1.0)


def combination_nodes(
    z: gs.Tensor, y: gs.Tensor, S: np.ndarray, bias: np.ndarray | None, sparse: bool, prefix: str
) -> list[gs.Node]:
    """The 1x1 combination Y = S Z + b: SparseConv over the CSR of S [N, B], or a dense 1x1 Conv."""
    N, B = S.shape
    b = [gs.Constant(new_name(prefix, "bias"), bias.astype(np.float32))] if bias is not None else []
    if not sparse:
        weight = gs.Constant(new_name(prefix, "S"), np.ascontiguousarray(S.reshape(N, B, 1, 1), np.float32))
        attrs = {"kernel_shape": [1, 1]}
        return [gs.Node("Conv", new_name(prefix, "combine"), attrs, [z, weight, *b], [y])]
    values, indices, row_ptr = to_csr(np.ascontiguousarray(S.T))
    csr = [
        gs.Constant(new_name(prefix, "values"), values),
        gs.Constant(new_name(prefix, "indices"), indices),
        gs.Constant(new_name(prefix, "row_ptr"), row_ptr),
    ]
    attrs = {"C": B, "kernel_shape": [1, 1], "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1]}
    return [gs.Node("SparseConv", new_name(prefix, "combine"), attrs, [z, *csr, *b], [y], domain=DOMAIN)]


def _emitter(load: Callable, bias: np.ndarray | None, g, form: str, sparse: bool) -> Callable:
    def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
        D, S = load()
        x, y = node.inputs[0], node.outputs[0]
        z = gs.Variable(new_name(prefix, "basis_out"), dtype=np.float32)
        attrs = {
            "kernel_shape": [g.kh, g.kw],
            "strides": list(g.strides),
            "pads": explicit_pads(node),
            "dilations": list(g.dilations),
        }
        if form == "channel":  # row c q + j of the block-diagonal D holds kernel j of channel c
            taps = g.kh * g.kw
            q = len(D) // g.C
            blocks = D.reshape(g.C, q, g.C, taps)[np.arange(g.C), :, np.arange(g.C)]  # [C, q, taps]
            weight = blocks.reshape(g.C * q, 1, g.kh, g.kw)
            attrs["group"] = g.C
        else:
            weight = D.reshape(len(D), g.C, g.kh, g.kw)
        w = gs.Constant(new_name(prefix, "D"), np.ascontiguousarray(weight, np.float32))
        basis = gs.Node("Conv", new_name(prefix, "basis"), attrs, [x, w], [z])
        return replace_node(graph, node, [basis, *combination_nodes(z, y, S, bias, sparse, prefix)])

    return emit
