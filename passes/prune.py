"""prune: fine-grained pruning without retraining of Gemm/MatMul (constant float32 weight) and Conv (group 1).

A layer y = x W + b (W: K x N; a Conv in its im2col form, W = A^T with A its weight as M x (C kh kw) and x the
input patches) keeps only a fraction of its weights. Per node the options are sparsity levels, most
compressive first (LADDER, or `--set prune.sparsity=S`; `prune.fc_sparsity` and `prune.conv_sparsity` fix it
for Gemm/MatMul or Conv alone), each with its error estimated on held-out
calibration rows: the pass manager's bisection and greedy steps then choose the sparsity of every layer from
the budget. The math (OBS saliency, patterns, the exact masked least-squares re-fit, prune-and-restore, the
error estimate, the CSR layout) is in prune_fit.py.

Settings: `prune.sparsity=S` (one level), `prune.pattern=unstructured|N:M|RxC` (e.g. 2:4, 1x4, 4x4: R outputs
by C consecutive inputs, the rows of W^T a sparse kernel streams), `prune.reconstruct=0` (masking only),
`prune.saliency=magnitude` (Han et al.'s |w| instead of OBS), `prune.restore=R` (prune-and-restore rounds),
`prune.damping=D`, `prune.layers=all|fc|conv` (which layer kinds to prune), `prune.min_k=K` (layers
whose outputs see fewer inputs are declined, default MIN_K), `prune.objective=size|latency` (latency: the
energy-aware mode of prune_sparse.latency_options).

Emission (prune_sparse.py): per level, SparseGemm / SparseConv over the CSR of the pruned weight where the
layer measures faster that way, else the same op with the pruned dense weight (standard ONNX, runs anywhere,
smaller once the file is compressed). Where that choice was timed, the dense form is kept as the option's
fallback: the pass manager times the whole model, and if it is not faster the layers go back to dense weights,
still pruned (small models are dominated by what their layers share). The Record counts params_after as
the nonzeros (+ bias); bytes_after and FLOPs as the emitted form stores and computes them (CSR and 2 per
kept weight, or the dense weight).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes import prune_fit as fit
from onnxopt.passes import prune_sparse as sparse_exec
from onnxopt.passes.convolution import has_bias
from onnxopt.passes.dense import dense_bias, dense_kn, dense_weight, structured_problem
from onnxopt.passes.lowrank import MAX_ROWS, rows
from onnxopt.passes.lowrank_conv import geometry, patches
from onnxopt.rewrite import (
    Decline,
    Option,
    Pass,
    PassContext,
    constant_value,
    new_name,
    replace_node,
    weight_problem,
)

# A layer whose outputs each see fewer inputs (the first Conv of a grayscale CNN: 1 x 3 x 3) has few weights
# to gain and each one matters: on Fashion-MNIST, conv1 at 50% costs more top-1 than all other layers.
MIN_K = 16
LADDER = (0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
# Below this estimated error (a fraction of the local tolerance: lowrank's finest rung) sparser options are
# still offered but less sparse ones are not computed: they could not be told apart by the budget.
FLOOR = 1 / 128


def _flag(value: str) -> bool:
    return value.lower() not in ("0", "false", "no")


class Prune(Pass):
    name = "prune"
    op_types = ("Gemm", "MatMul", "Conv")
    lossy = True
    default = False  # opt-in: planning re-fits every layer at every sparsity level (minutes on a real model)
    summary = (
        "Gemm/MatMul/Conv -> the same op with a pruned weight (OBS or magnitude mask, least-squares re-fit)"
    )

    def check(self, node: gs.Node, ctx: PassContext) -> str | None:
        try:
            pattern = fit.parse_pattern(ctx.setting("pattern", str, "unstructured"))
        except ValueError as e:
            return str(e)
        layers = ctx.setting("layers", str, "all")
        if layers not in ("all", "fc", "conv"):
            return f"layers={layers!r} is not all, fc or conv"
        if layers != ("conv" if node.op == "Conv" else "fc") and layers != "all":
            return f"{node.op} layers are not selected (prune.layers={layers})"
        problem = conv_problem(node, ctx) if node.op == "Conv" else structured_problem(node, ctx, 1)
        if problem:
            return problem
        K, N = conv_kn(node) if node.op == "Conv" else dense_kn(node)
        if problem := fit.pattern_problem(pattern, K, N):
            return problem
        min_k = ctx.setting("min_k", int, MIN_K)
        if K < min_k:
            return f"K={K} inputs per output are too few to prune (prune.min_k={min_k})"
        return None

    def activations_needed(self, node: gs.Node) -> list[str]:
        return [node.inputs[0].name]

    def options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        pattern = fit.parse_pattern(ctx.setting("pattern", str, "unstructured"))
        kind = "conv_sparsity" if node.op == "Conv" else "fc_sparsity"
        levels = sparsity_levels(pattern, ctx.setting(kind, float, ctx.setting("sparsity", float)))
        W, bias, X, rows_out = layer_problem(node, ctx)
        K, N = W.shape
        reconstruct = ctx.setting("reconstruct", _flag, True)
        saliency = ctx.setting("saliency", str, "obs")
        if saliency not in ("obs", "magnitude"):
            raise Decline(f"saliency {saliency!r} is not obs or magnitude")
        restore = ctx.setting("restore", int, fit.RESTORE_STEPS)
        fit_rows = held = factors = None
        if X is not None and len(X) >= 4:
            fit_rows, held = X[0::2], X[1::2]
            if reconstruct or saliency == "obs":
                factors = fit.hessian_pair(fit_rows, ctx.setting("damping", float, fit.DAMPING))
        dense_flops = 2 * rows_out * K * N
        extra = N if bias is not None else 0
        dense_bytes = 4 * (K * N + extra)  # a dense weight holding zeros is stored in full
        options, loads = [], []
        for s in levels:
            p = fit.prune(W, fit_rows, s, pattern, reconstruct, saliency, restore, factors=factors)
            err = fit.relative_error(W, p.weight, held, bias)
            nnz = int(np.count_nonzero(p.weight))
            loads.append(ctx.park(p.weight))
            options.append(
                Option(
                    est_error=err,
                    params_after=nnz + extra,
                    bytes_after=dense_bytes,
                    flops_after=dense_flops,
                    emit=self._emitter(loads[-1]),
                    detail={
                        "sparsity": round(1.0 - nnz / (K * N), 4),
                        "target": s,
                        "pattern": str(pattern),
                        "saliency": p.saliency,
                        "reconstructed": bool(reconstruct and fit_rows is not None),
                        "restores": p.restores,
                        "refit": p.refit,
                        "shape": [K, N],
                        "nnz": nnz,
                        "emitted": "dense",
                    },
                )
            )
            if err <= ctx.local_tolerance * FLOOR:
                break
        sparse, timed = sparse_exec.choose(node, ctx, options, loads, bias)
        for i, (load, chosen) in enumerate(zip(loads, sparse, strict=True)):
            if chosen:  # the file holds the CSR, and the kernel does 2 multiply-adds per kept weight
                o = options[i]
                options[i] = replace(
                    o,
                    bytes_after=fit.csr_bytes(o.detail["nnz"], N) + 4 * extra,
                    flops_after=2 * rows_out * o.detail["nnz"],
                    emit=sparse_exec.emitter(load, bias, True, o.emit),
                    detail={**o.detail, "emitted": "sparse"},
                    fallback=o if timed else None,  # chosen for speed: dense if the model is not faster
                )
        objective = ctx.setting("objective", str, "size")
        if objective == "latency":
            return sparse_exec.latency_options(options, timed)
        if objective != "size":
            raise Decline(f"prune.objective={objective!r} is not size or latency")
        return options

    def _emitter(self, load):
        def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
            (W,) = load()
            x, y = node.inputs[0], node.outputs[0]
            rest = list(node.inputs[2:3]) if len(node.inputs) > 2 and node.inputs[2].name else []
            attrs = dict(node.attrs)
            if node.op == "Conv":
                weight = np.ascontiguousarray(W.T).reshape(tuple(int(d) for d in node.inputs[1].shape))
            elif node.op == "Gemm":
                attrs["alpha"] = 1.0  # dense_weight folded alpha into W
                weight = np.ascontiguousarray(W.T) if attrs.get("transB", 0) else W
            else:
                weight = W
            inputs = [x, gs.Constant(new_name(prefix, "W"), weight.astype(np.float32)), *rest]
            pruned = gs.Node(node.op, new_name(prefix, "pruned"), attrs=attrs, inputs=inputs, outputs=[y])
            return replace_node(graph, node, [pruned])

        return emit


def sparsity_levels(pattern: fit.Pattern, fixed: float | None) -> list[float]:
    """The sparsities to offer, most compressive first: the pattern's own for N:M, else `fixed` or LADDER."""
    own = pattern.fixed_sparsity
    if own is not None:
        if fixed is not None and abs(fixed - own) > 1e-9:
            raise Decline(f"sparsity {fixed:g} contradicts pattern {pattern} (sparsity {own:g})")
        return [own]
    if fixed is not None:
        if not 0.0 < fixed < 1.0:
            raise Decline(f"sparsity {fixed:g} is not in (0, 1)")
        return [fixed]
    return list(LADDER)


def conv_problem(node: gs.Node, ctx: PassContext) -> str | None:
    """Why prune cannot take this Conv: a constant float32 group-1 2-D weight used once, a constant bias,
    explicit pads and a 4-D input of known shape; None if it can."""
    if problem := weight_problem(node):
        return problem
    shape = tuple(node.inputs[1].shape)
    if len(shape) != 4:
        return f"weight has rank {len(shape)}, not a 2-D convolution"
    if ctx.consumers.get(node.inputs[1].name, 0) > 1:
        return "weight initializer is shared with other nodes"
    if node.attrs.get("group", 1) != 1:
        return f"group={node.attrs['group']}: grouped convolutions are not pruned"
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"auto_pad={node.attrs['auto_pad']} is not supported (explicit pads only)"
    if has_bias(node) and not isinstance(node.inputs[2], gs.Constant):
        return "bias is not constant"
    x, y = ctx.shapes.get(node.inputs[0].name), ctx.shapes.get(node.outputs[0].name)
    if x is None or y is None or len(x) != 4:
        return "input shape unknown or not 4-D"
    return None


def conv_kn(node: gs.Node) -> tuple[int, int]:
    """(K, N) of a Conv's im2col form: K = C kh kw inputs per patch, N = M outputs."""
    M, C, kh, kw = (int(d) for d in node.inputs[1].shape)
    return C * kh * kw, M


def layer_problem(
    node: gs.Node, ctx: PassContext
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]:
    """(W K x N, bias [N] or None, calibration rows [n, K] or None, output rows the layer computes)."""
    X = ctx.activations.get(node.inputs[0].name)
    if node.op == "Conv":
        g = geometry(tuple(node.inputs[1].shape), node.attrs)
        W = constant_value(node.inputs[1]).astype(np.float32, copy=False).reshape(g.M, -1).T
        bias = constant_value(node.inputs[2]).astype(np.float32).reshape(-1) if has_bias(node) else None
        y = ctx.shapes[node.outputs[0].name]
        return W, bias, patches(X, g, MAX_ROWS) if X is not None else None, int(y[0] * y[2] * y[3])
    W = dense_weight(node)
    K, N = W.shape
    out = ctx.shapes.get(node.outputs[0].name, (1, N))
    return W, dense_bias(node, N), rows(X, K) if X is not None else None, int(np.prod(out[:-1]))
