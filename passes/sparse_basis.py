"""sparse_basis: a Conv's filters as sparse combinations of a few basis filters (Liu et al., CVPR 2015),
fitted on calibration data without retraining.

A Conv (group 1, kernel larger than 1x1) with weight W [N, C, kh, kw] is, on each input patch p (C kh kw
values), y = A p + b with A = W reshaped to N x K, K = C kh kw. It becomes A ≈ S D (sparse_basis_fit.py has
the math: a weighted SVD for the basis, OMP-like hard thresholding with exact least-squares re-fits for the
coefficients, basis updates by the method of optimal directions, all in the metric of the calibration
patches' second moments, so the layer's output on calibration data is what is kept):

    Z = Conv(X, D [B, C, kh, kw])       the basis conv: the layer's strides, pads and dilations, no bias
    Y = SparseConv1x1(Z, S [N, B]) + b  the combination: CSR of S (onnxopt's SparseConv, 1x1 path), or a
                                        dense 1x1 Conv where S is too dense for the sparse kernel to pay

This is Liu et al.'s shared ("inter-channel") basis over all input channels; their per-channel form (a grouped
basis conv, groups = C) runs as a grouped conv, which onnxruntime executes at a fraction of its dense speed
on this CPU, so it is not offered.

Options: every pair (B, density of S) on a grid (B on lowrank's grid below N, densities DENSITIES), each
fitted and its error estimated on held-out calibration patches, ||P (A - S D)^T|| / ||P A^T + b||; only
options that save both bytes and FLOPs of what is emitted are kept (the basis conv dense, the CSR at 8 bytes
and 2 FLOPs per nonzero, or the dense 1x1), and only those on the Pareto front of (bytes, error), most
compressive first. Without calibration data the metric is the identity (weight error).

Settings: `sparse_basis.sparse=auto|0|1` (auto: densities up to 1 - SPARSE_AT run as SparseConv, where the
1x1 sparse kernel measured faster than dense (BENCHMARKS.md), and the dense 1x1 is offered with every
coefficient kept, S dense (a rank-B factorization); 1: every density sparse; 0: every density as a dense 1x1
holding S's zeros, standard ONNX that is smaller only once the file is compressed, as prune's sparse=0),
`sparse_basis.basis=B` (one basis size), `sparse_basis.density=F` (one density), `sparse_basis.damping=D`.
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
        for B in _bases(ctx, N, K):
            for density in _densities(ctx, mode):
                sparse = mode == "1" or (mode == "auto" and 1 - density >= SPARSE_AT)
                # in auto mode a dense 1x1 keeps every coefficient: its zeros would cost the same
                nnz = N * B if mode == "auto" and not sparse else max(1, round(density * N * B))
                comb_bytes, comb_flops = (csr_bytes(nnz, N), 2 * nnz) if sparse else (4 * N * B, 2 * N * B)
                cost = (4 * B * K + comb_bytes + 4 * extra, pixels * (2 * B * K + comb_flops))
                if cost[0] >= before[0] or cost[1] >= before[1]:
                    continue
                candidates.append((cost, B, nnz, sparse))
        if not candidates:
            raise Decline(f"no basis size below {N} filters saves both bytes and FLOPs over {N} x {K}")
        options, best = [], float("inf")
        for cost, B, nnz, sparse in sorted(candidates, key=lambda c: (c[0][0], c[0][1])):
            f = sbf.fit(layer, B, nnz)
            err = relative_error(A.T, (f.coef @ f.basis).T, held, bias)
            if err >= best:  # not on the Pareto front: a smaller option is at least as accurate
                continue
            best = err
            nnz_kept = int(np.count_nonzero(f.coef))
            options.append(
                Option(
                    est_error=err,
                    params_after=B * K + nnz_kept + extra,
                    bytes_after=cost[0],
                    flops_after=cost[1],
                    emit=_emitter(ctx.park(f.basis, f.coef), bias, g, sparse),
                    detail={
                        "basis": B,
                        "nnz": nnz_kept,
                        "density": round(nnz_kept / (N * B), 4),
                        "shape": [N, K],
                        "emitted": "sparse" if sparse else "dense",
                        "train_error": round(f.train_error, 5),
                    },
                )
            )
            if err <= ctx.local_tolerance * FLOOR:
                break  # larger options could not be told apart by the budget
        return options


def _bases(ctx: PassContext, N: int, K: int) -> list[int]:
    fixed = ctx.setting("basis", int)
    if fixed is not None:
        if not 1 <= fixed < min(N, K + 1):
            raise Decline(f"sparse_basis.basis={fixed} is not in [1, {min(N, K + 1) - 1}]")
        return [fixed]
    return [b for b in rank_grid(min(N - 1, K)) if b >= 2]


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


def _emitter(load: Callable, bias: np.ndarray | None, g, sparse: bool) -> Callable:
    def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
        D, S = load()
        B = len(D)
        x, y = node.inputs[0], node.outputs[0]
        z = gs.Variable(new_name(prefix, "basis_out"), dtype=np.float32)
        attrs = {
            "kernel_shape": [g.kh, g.kw],
            "strides": list(g.strides),
            "pads": explicit_pads(node),
            "dilations": list(g.dilations),
        }
        weight = gs.Constant(new_name(prefix, "D"), np.ascontiguousarray(D.reshape(B, g.C, g.kh, g.kw)))
        basis = gs.Node("Conv", new_name(prefix, "basis"), attrs, [x, weight], [z])
        return replace_node(graph, node, [basis, *combination_nodes(z, y, S, bias, sparse, prefix)])

    return emit
