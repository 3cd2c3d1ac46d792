"""prune's sparse execution: which pruned layers run as SparseGemm / SparseConv, and the nodes that do it.

A pruned layer can stay the same op with a dense weight holding zeros (standard ONNX: no faster, smaller only
once the file is compressed) or become SparseGemm / SparseConv over the CSR of its weight (the kernels stream
only the kept weights: onnxopt/reference/prune.py). Which one pays depends on density, shape and threads, so
it is measured on the layer itself: the original node and the sparse op at the densest and the sparsest
offered level, cut out as one-node models and timed A/B with the cache flushed (onnxopt.timing). The sparse
op's time is close to affine in the kept weights, t(nnz) = t0 + c nnz, so the two points give it for every
level in between; a level runs sparse where t(nnz) beats the original by timing.MIN_GAIN. The whole model is
then timed as well (onnxopt.manager): unless it is MIN_GAIN faster, the sparse levels fall back to dense.

Settings: `prune.sparse=auto` (default: measured as above), `1` (every level sparse), `0` (every level
dense); `prune.measure=0` skips the timing and runs sparse from SPARSE_AT sparsity up (where the kernels
measured faster on every benchmarked shape, BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import DOMAIN
from onnxopt.passes.convolution import explicit_pads
from onnxopt.passes.prune_fit import to_csr
from onnxopt.rewrite import Decline, Option, PassContext, new_name, replace_node
from onnxopt.timing import MIN_GAIN, layer_model, median_times

SPARSE_AT = 0.7  # without timing, levels of at least this sparsity run sparse


def _flag(value: str) -> bool:
    return value.lower() not in ("0", "false", "no")


def sparse_nodes(node: gs.Node, W: np.ndarray, bias: np.ndarray | None, prefix: str) -> list[gs.Node]:
    """SparseGemm (Gemm/MatMul, W as K x N) or SparseConv (W as the im2col C kh kw x M) computing the node
    with the pruned weight W; the node's own input and output."""
    values, indices, row_ptr = to_csr(W)
    inputs = [
        node.inputs[0],
        gs.Constant(new_name(prefix, "values"), values),
        gs.Constant(new_name(prefix, "indices"), indices),
        gs.Constant(new_name(prefix, "row_ptr"), row_ptr),
    ]
    if bias is not None:
        inputs.append(gs.Constant(new_name(prefix, "bias"), bias.astype(np.float32)))
    if node.op == "Conv":
        C, kh, kw = (int(d) for d in node.inputs[1].shape[1:])
        a = node.attrs
        attrs = {
            "C": C,
            "kernel_shape": [kh, kw],
            "strides": [int(s) for s in a.get("strides", [1, 1])],
            "pads": explicit_pads(node),
            "dilations": [int(d) for d in a.get("dilations", [1, 1])],
        }
        op = "SparseConv"
    else:
        attrs, op = {"K": int(W.shape[0])}, "SparseGemm"
    new = gs.Node(op, new_name(prefix, "sparse"), attrs, inputs, [node.outputs[0]], domain=DOMAIN)
    return [new]


def emitter(load: Callable, bias: np.ndarray | None, sparse: bool, dense_emit: Callable) -> Callable:
    """The emit function of one option: sparse nodes from the parked weight, or the dense emitter."""
    if not sparse:
        return dense_emit

    def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
        (W,) = load()
        return replace_node(graph, node, sparse_nodes(node, W, bias, prefix))

    return emit


def choose(
    node: gs.Node, ctx: PassContext, options: list[Option], loads: list[Callable], bias: np.ndarray | None
) -> tuple[list[bool], bool]:
    """Per option (sparsest first, as offered), whether it runs sparse, and whether that was decided by timing
    (then the whole model is timed too: onnxopt.manager); records the timings in the details. `loads[i]`
    loads option i's pruned weight."""
    mode = ctx.setting("sparse", str, "auto")
    if mode not in ("auto", "0", "1"):
        raise Decline(f"prune.sparse={mode!r} is not auto, 0 or 1")
    if mode != "auto":
        return [mode == "1"] * len(options), False
    if not ctx.setting("measure", _flag, True):
        return [o.detail["sparsity"] >= SPARSE_AT for o in options], False
    ends = [0, len(options) - 1] if len(options) > 1 else [0]
    probes = [Option(0.0, 0, 0, 0, emitter(loads[i], bias, True, None), {}) for i in ends]
    batch = ctx.setting("batch", int, 1)
    models = [layer_model(node, ctx, None, batch)] + [layer_model(node, ctx, p, batch) for p in probes]
    base, *times = median_times(models, ctx.threads)
    nnz = [options[i].detail["nnz"] for i in ends]
    slope = (times[-1] - times[0]) / (nnz[-1] - nnz[0]) if len(ends) > 1 and nnz[-1] != nnz[0] else 0.0
    decisions = []
    for o in options:
        t = times[0] + slope * (o.detail["nnz"] - nnz[0])
        o.detail.update(ms_dense=round(base, 4), ms_sparse_est=round(t, 4), threads=ctx.threads)
        decisions.append(base / max(t, 1e-9) >= MIN_GAIN)
    return decisions, True


def latency_options(options: list[Option], timed: bool) -> list[Option]:
    """The energy-aware mode (`prune.objective=latency`, after Yang et al., with measured time standing in
    for their energy model): only the levels that run faster, each saying how many milliseconds it saves, so
    the pass manager spends the error budget where it buys the most time. A pruned layer that is no faster
    costs accuracy for nothing here: such levels are not offered, and a sparse level is undone (not made
    dense) if the whole model is not faster."""
    if not timed:
        raise Decline("prune.objective=latency times every layer: it needs prune.sparse=auto and measure=1")
    faster = [
        replace(o, fallback=None, speed_only=True, ms_saved=o.detail["ms_dense"] - o.detail["ms_sparse_est"])
        for o in options
        if o.detail["emitted"] == "sparse"
    ]
    if not faster:
        d = options[0].detail
        raise Decline(
            f"no sparsity level runs faster than the dense layer: {d['ms_dense']:.4f} ms dense, "
            f"{d['ms_sparse_est']:.4f} ms sparse at {d['sparsity']:.0%} (estimated)"
        )
    return faster
