"""filter_prune: structured removal of whole Conv filters, giving a smaller dense model in standard ops.

A group-1 Conv A with M filters keeps k of them (options: k from KEEP_FRACTIONS of M, fewest first). The
channels it stops producing are removed from everything downstream that is indexed by channel, up to the
consumer that mixes them (filter_graph.py): A's filters and bias, BatchNormalization parameters, and the
consumer's input channels (a Conv's weight columns, or the H W rows per channel of a Gemm/MatMul after
Flatten). Which filters go and how the consumer absorbs them is filter_fit.py: selection by `merge`
(default), `apoz` or `l1`, and the least-squares re-fit of the consumer on the kept channels (over its
input patches for a Conv consumer, else the merge of the removed maps into the kept ones;
`filter_prune.reconstruct=0`: plain removal). The estimated error is the consumer's output error on
held-out calibration images: that is what the rest of the model sees.

One option rewrites several nodes: A (replaced), the BatchNormalizations between (parameters sliced in
place) and the consumer (its weight and bias replaced in place). The consumer is `owned` by this candidate
(no later pass may claim it). When the consumer is itself a candidate (conv1 -> conv2 -> conv3 all pruned),
both edit its weight: candidates are applied in graph order, so A sets the consumer's input columns for all
of its filters, then the consumer's own emit keeps the rows (filters) it chose from that weight; an emit
finding its consumer already reshaped raises rather than build a wrong graph. Records count A, the
BatchNormalizations and the consumer before and after (the consumer's FLOPs fall too); when a consumer is
also pruned, the two records each count their own change on it.

Settings: `filter_prune.criterion=merge|apoz|l1`, `filter_prune.reconstruct=0|1` (default 1).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes import filter_fit as fit
from onnxopt.passes.convolution import has_bias
from onnxopt.passes.dense import dense_bias, dense_weight
from onnxopt.passes.filter_graph import BN_PARAMS, Chain, follow
from onnxopt.passes.lowrank import MAX_ROWS
from onnxopt.passes.lowrank_conv import geometry, patches
from onnxopt.passes.prune import conv_problem
from onnxopt.rewrite import Decline, Option, Pass, PassContext, constant_value, new_name, replace_node

KEEP_FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 15 / 16, 31 / 32)
FIT_ROWS = 200_000  # calibration positions the merge is fitted on (a seeded sample beyond that)
ERROR_ROWS = 4096  # held-out consumer rows the error is measured on
# Once an option's estimated error is this fraction of the local tolerance, keeping more filters is not
# offered: the budget could not tell the options apart.
FLOOR = 1 / 128


def _flag(value: str) -> bool:
    return value.lower() not in ("0", "false", "no")


class FilterPrune(Pass):
    name = "filter_prune"
    op_types = ("Conv",)
    lossy = True
    default = False  # opt-in: it changes the model's layer widths, which callers may rely on
    summary = "Conv -> fewer filters (merge/APoZ/L1), the next layer's input channels cut and re-fitted"

    def __init__(self) -> None:
        self._chains: dict[str, Chain] = {}

    def check(self, node: gs.Node, ctx: PassContext) -> str | None:
        criterion = ctx.setting("criterion", str, "merge")
        if criterion not in fit.CRITERIA:
            return f"criterion {criterion!r} is not one of {', '.join(fit.CRITERIA)}"
        if problem := conv_problem(node, ctx):
            return problem
        if int(node.inputs[1].shape[0]) < 2:
            return "a Conv with one filter has none to remove"
        chain = follow(node, ctx.graph, ctx.consumers)
        if isinstance(chain, str):
            return chain
        x = ctx.shapes.get(chain.consumer_input)
        if x is None or len(x) != 4:
            return f"the consumer's input {chain.consumer_input} is not known to be 4-D (NCHW)"
        self._chains[node.name] = chain
        return None

    def owned(self, node: gs.Node, ctx: PassContext) -> list[str]:
        chain = self._chains.get(node.name)
        return [chain.consumer] if chain else []

    def activations_needed(self, node: gs.Node) -> list[str]:
        chain = self._chains[node.name]
        return [chain.consumer_input] + ([chain.relu_output] if chain.relu_output else [])

    def cost(self, node: gs.Node, ctx: PassContext) -> dict[str, int]:
        params, flops = _chain_cost(node, self._chains[node.name], ctx, int(node.inputs[1].shape[0]), None)
        return {"params_before": params, "bytes_before": 4 * params, "flops_before": flops}

    def options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        chain = self._chains[node.name]
        M = int(node.inputs[1].shape[0])
        Y = ctx.activations.get(chain.consumer_input)
        if Y is None or len(Y) < 2:
            raise Decline("needs calibration activations of at least 2 images (fit and held-out)")
        consumer = _node(ctx.graph, chain.consumer)
        Wc, b, to_rows, to_patches = _consumer_form(consumer, M, ctx)
        fit_y, held_y = Y[0::2], Y[1::2]
        rows = np.moveaxis(fit_y, 1, -1).reshape(-1, M)
        if len(rows) > FIT_ROWS:
            rows = rows[np.sort(np.random.default_rng(0).choice(len(rows), FIT_ROWS, replace=False))]
        G = fit.gram(rows)
        P = to_rows(held_y)
        criterion = ctx.setting("criterion", str, "merge")
        order = _order(criterion, node, chain, G, Wc, ctx)
        reconstruct = ctx.setting("reconstruct", _flag, True)
        intercept = consumer.op != "MatMul"  # MatMul has no bias to absorb the constant
        H, P_fit = None, to_patches(fit_y)
        if reconstruct and intercept and fit.patch_fit_fits(P_fit):
            H = fit.gram(P_fit)
        ref, ref_fit = fit.consumer_output(P, Wc, b), fit.consumer_output(P_fit, Wc, b)
        options = []
        for k in keep_counts(M):
            keep = np.sort(order[:k])
            how = "none"
            W_new, b_new = fit.consumer_update(Wc, b, keep, None, None)
            if H is not None:
                (W_new, b_new), how = fit.patch_fit(H, Wc, b, keep), "patches"
            elif reconstruct:
                merged = fit.consumer_update(Wc, b, keep, *fit.merge_coefficients(G, keep, intercept))
                # The merge fits the maps, not the consumer's output: keep it where it serves the output
                # better on the calibration rows it was fitted on (held-out rows only measure the result).
                if fit.consumer_error(P_fit, ref_fit, keep, *merged) < fit.consumer_error(
                    P_fit, ref_fit, keep, W_new, b_new
                ):
                    (W_new, b_new), how = merged, "channels"
            err = fit.consumer_error(P, ref, keep, W_new, b_new)
            params, flops = _chain_cost(node, chain, ctx, k, b_new)
            options.append(
                Option(
                    est_error=err,
                    params_after=params,
                    bytes_after=4 * params,
                    flops_after=flops,
                    emit=_emitter(chain, M, keep, ctx.park(W_new, _or_empty(b_new))),
                    detail={
                        "kept_filters": k,
                        "of": M,
                        "criterion": criterion,
                        "reconstructed": reconstruct,
                        "fit": how,
                        "nodes_touched": [node.name, *chain.between, chain.consumer],
                        "kept": keep.tolist(),
                    },
                )
            )
            if err <= ctx.local_tolerance * FLOOR:
                break
        return options


def keep_counts(M: int) -> list[int]:
    """Numbers of filters to keep, fewest first: KEEP_FRACTIONS of M, at least 1 and fewer than M."""
    return sorted({k for f in KEEP_FRACTIONS if 1 <= (k := round(f * M)) < M})


def _node(graph: gs.Graph, name: str) -> gs.Node:
    found = next((n for n in graph.nodes if n.name == name), None)
    if found is None:
        raise ValueError(f"node {name} is no longer in the graph (rewritten by another candidate first?)")
    return found


def _or_empty(b: np.ndarray | None) -> np.ndarray:
    return np.zeros(0, np.float32) if b is None else b


def _order(criterion: str, node: gs.Node, chain: Chain, G: np.ndarray, Wc: np.ndarray, ctx) -> np.ndarray:
    if criterion == "l1":
        return fit.l1_order(constant_value(node.inputs[1]))
    if criterion == "apoz":
        return fit.apoz_order(ctx.activations[chain.relu_output or chain.consumer_input])
    return fit.merge_order(G, np.square(Wc.astype(np.float64)).sum(axis=(1, 2)))


def _consumer_form(consumer: gs.Node, M: int, ctx: PassContext):
    """(Wc [M, k, N], bias [N] or None, and two maps of NCHW activations to the consumer's input rows
    [n, M k]: at most ERROR_ROWS to measure on, at most MAX_ROWS (other patches) to fit on)."""
    if consumer.op == "Conv":
        W4 = constant_value(consumer.inputs[1]).astype(np.float32)
        if W4.shape[1] != M:
            raise Decline(f"consumer {consumer.name} reads {W4.shape[1]} channels, not {M}")
        g = geometry(W4.shape, consumer.attrs)
        Wc = W4.transpose(1, 2, 3, 0).reshape(M, g.kh * g.kw, g.M)
        b = constant_value(consumer.inputs[2]).astype(np.float32).reshape(-1) if has_bias(consumer) else None
        return Wc, b, lambda Y: patches(Y, g, ERROR_ROWS), lambda Y: patches(Y, g, MAX_ROWS, seed=1)
    W = dense_weight(consumer)
    K, N = W.shape
    if K % M:
        raise Decline(f"consumer {consumer.name} has {K} input rows, not a multiple of {M} channels")
    return (
        W.reshape(M, K // M, N),
        dense_bias(consumer, N),
        lambda Y: Y.reshape(len(Y), -1)[:ERROR_ROWS],
        lambda Y: Y.reshape(len(Y), -1)[:MAX_ROWS],
    )


def _chain_cost(node: gs.Node, chain: Chain, ctx: PassContext, k: int, b_new) -> tuple[int, int]:
    """(parameters, FLOPs) of A, its BatchNormalizations and its consumer when A keeps k filters; `b_new` is
    the consumer's new bias (None: count the bias it has now)."""
    M, C, kh, kw = (int(d) for d in node.inputs[1].shape)
    y = ctx.shapes[node.outputs[0].name]
    params = k * C * kh * kw + (k if has_bias(node) else 0) + BN_PARAMS * k * len(chain.batchnorms)
    flops = 2 * int(np.prod(y)) // M * k * C * kh * kw
    consumer = next(n for n in ctx.graph.nodes if n.name == chain.consumer)
    w = tuple(int(d) for d in consumer.inputs[1].shape)
    z = ctx.shapes.get(consumer.outputs[0].name)
    if consumer.op == "Conv":
        per_channel, N = w[2] * w[3], w[0]
    else:
        K = w[1] if consumer.op == "Gemm" and consumer.attrs.get("transB", 0) else w[0]
        per_channel, N = K // M, (w[0] if consumer.op == "Gemm" and consumer.attrs.get("transB", 0) else w[1])
    had_bias = consumer.op != "MatMul" and len(consumer.inputs) > 2 and bool(consumer.inputs[2].name)
    params += k * per_channel * N + (N if (had_bias if b_new is None else True) else 0)
    if z:
        flops += 2 * int(np.prod(z)) * k * per_channel
    return params, flops


def _emitter(chain: Chain, M: int, keep: np.ndarray, load):
    def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
        W_new, b_new = load()
        nodes = {n.name: n for n in graph.nodes}
        W = constant_value(node.inputs[1])
        if W.shape[0] != M:
            raise ValueError(f"{node.name} has {W.shape[0]} filters, expected {M}")
        inputs = [node.inputs[0], gs.Constant(new_name(prefix, "W"), np.ascontiguousarray(W[keep]))]
        if has_bias(node):
            bias = constant_value(node.inputs[2]).reshape(-1)
            inputs.append(gs.Constant(new_name(prefix, "B"), np.ascontiguousarray(bias[keep])))
        y = node.outputs[0]
        pruned = gs.Node("Conv", new_name(prefix, "conv"), dict(node.attrs), inputs, [y])
        for name in chain.batchnorms:
            bn = nodes[name]
            for i in range(1, 1 + BN_PARAMS):
                value = constant_value(bn.inputs[i])
                bn.inputs[i] = gs.Constant(new_name(prefix, f"{name}_{i}"), np.ascontiguousarray(value[keep]))
        consumer = nodes.get(chain.consumer)
        if consumer is None:
            raise ValueError(f"consumer {chain.consumer} is no longer in the graph")
        _set_consumer(consumer, M, W_new, b_new if b_new.size else None, prefix)
        tensors = graph.tensors()
        for name in chain.tensors:  # their channel count changed: let shape inference say it again
            tensors[name].shape = None
        return replace_node(graph, node, [pruned])

    return emit


def _set_consumer(
    consumer: gs.Node, M: int, W_new: np.ndarray, b_new: np.ndarray | None, prefix: str
) -> None:
    """Replace the consumer's weight (and bias) in place by the fitted ones on the kept channels."""
    shape = tuple(int(d) for d in consumer.inputs[1].shape)
    S, k, N = W_new.shape
    if consumer.op == "Conv":
        if shape[1] != M or shape[0] != N:
            raise ValueError(
                f"consumer {consumer.name} weight {list(shape)} was reshaped before its producer"
            )
        weight = W_new.reshape(S, shape[2], shape[3], N).transpose(3, 0, 1, 2)
    else:
        transB = consumer.op == "Gemm" and consumer.attrs.get("transB", 0)
        if (shape[1] if transB else shape[0]) != M * k:
            raise ValueError(
                f"consumer {consumer.name} weight {list(shape)} was reshaped before its producer"
            )
        weight = W_new.reshape(S * k, N)
        weight = weight.T if transB else weight
        if consumer.op == "Gemm":
            consumer.attrs["alpha"] = 1.0  # dense_weight folded alpha into W_new
            consumer.attrs["beta"] = 1.0  # and dense_bias folded beta into b_new
    consumer.inputs[1] = gs.Constant(
        new_name(prefix, "next_W"), np.ascontiguousarray(weight, dtype=np.float32)
    )
    if b_new is not None:
        b = gs.Constant(new_name(prefix, "next_B"), np.ascontiguousarray(b_new, dtype=np.float32))
        if len(consumer.inputs) > 2:
            consumer.inputs[2] = b
        else:
            consumer.inputs.append(b)
