"""filter_prune of a channel group (filter_group.py): every producer loses the same filters, every consumer
the same input channels, each consumer re-fitted on what it still reads.

Keeping the root channels S of M (removing R), producer p keeps its filters S (weights, bias; the
BatchNormalizations, depthwise Convs and per-channel constants of the group sliced alike); a consumer
reading a tensor that holds the group at offsets O loses its input channels {o + r : o in O, r in R} and is
re-fitted by filter_fit on its own calibration input (the patch fit, else the channel merge, else plain
removal; see filter_fit.py). Several groups into one Concat are one candidate (a Joint): each keeps the
same fraction of its channels, chosen by its own order, and the Concat's readers lose all their removed
channels. Selection within a group is joint over its producers and consumers:

- `merge`: greedy elimination on the Gram matrix of the group's channels summed over every tensor a consumer
  reads (each block of M channels of it, each normalised by its trace), weighted by the consumers' use of
  channel m: sum over consumers of ||Wc[o + m]||^2 / ||Wc||^2 (filter_fit.merge_order);
- `l1`: the summed L1 norm of filter m over the producers, each producer's norms normalised to sum 1;
- `apoz`: the mean fraction of zeros of channel m over the tensors the consumers read.

The estimated error is the largest relative output error of any consumer on held-out calibration rows:
every layer that reads the group sees its own error, the rest of the model sees theirs.

Emitting edits nodes in place (the producers keep their names): a producer's filters are sliced, a consumer's
weight is replaced by its re-fit. Two candidates may edit one Conv, one its filters (rows) and one its input
channels (columns); whichever comes second adapts to the first, through the rows already kept, recorded on
the graph being built (`kept_rows`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes import filter_fit as fit
from onnxopt.passes.convolution import has_bias
from onnxopt.passes.dense import dense_bias, dense_weight
from onnxopt.passes.filter_graph import BN_PARAMS
from onnxopt.passes.filter_group import Group, Joint
from onnxopt.passes.lowrank import MAX_ROWS
from onnxopt.passes.lowrank_conv import geometry, patches
from onnxopt.rewrite import Decline, Option, PassContext, constant_value, new_name

FIT_ROWS = 200_000  # calibration positions a channel Gram matrix is computed on (a seeded sample beyond)
ERROR_ROWS = 4096  # held-out consumer rows the error is measured on
_ROWS_KEY = "_filter_prune_rows"


def kept_rows(graph: gs.Graph) -> dict[str, np.ndarray]:
    """Filters already kept, per Conv, by a candidate applied earlier to this graph (see the module doc)."""
    return graph.__dict__.setdefault(_ROWS_KEY, {})


def channel_gram(Y: np.ndarray) -> np.ndarray:
    """filter_fit.gram of the channels of NCHW activations Y, over at most FIT_ROWS positions."""
    rows = np.moveaxis(Y, 1, -1).reshape(-1, Y.shape[1])
    if len(rows) > FIT_ROWS:
        rows = rows[np.sort(np.random.default_rng(0).choice(len(rows), FIT_ROWS, replace=False))]
    return fit.gram(rows)


def consumer_form(consumer: gs.Node, M: int, ctx: PassContext):
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


class ConsumerFit:
    """One consumer of M input channels, re-fitted on a kept subset of them (filter_fit's module doc):
    calibration activations Y [n, M, H, W], even images fitted on, odd ones held out."""

    def __init__(
        self, consumer: gs.Node, M: int, Y: np.ndarray, ctx: PassContext, reconstruct: bool, G=None
    ) -> None:
        self.Wc, self.b, to_rows, to_patches = consumer_form(consumer, M, ctx)
        fit_y, held_y = Y[0::2], Y[1::2]
        self.reconstruct = reconstruct
        self.intercept = consumer.op != "MatMul"  # MatMul has no bias to absorb the constant
        self.P, self.P_fit = to_rows(held_y), to_patches(fit_y)
        self.H = None
        if reconstruct and self.intercept and fit.patch_fit_fits(self.P_fit):
            self.H = fit.gram(self.P_fit)
        self.G = G if G is not None or not reconstruct or self.H is not None else channel_gram(fit_y)
        self.ref = fit.consumer_output(self.P, self.Wc, self.b)
        self.ref_fit = fit.consumer_output(self.P_fit, self.Wc, self.b)

    def solve(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, float, str]:
        """(weights [|keep|, k, N], bias or None, held-out relative error, how it was fitted)."""
        W_new, b_new = fit.consumer_update(self.Wc, self.b, keep, None, None)
        how = "none"
        if self.H is not None:
            (W_new, b_new), how = fit.patch_fit(self.H, self.Wc, self.b, keep), "patches"
        elif self.reconstruct:
            merged = fit.consumer_update(
                self.Wc, self.b, keep, *fit.merge_coefficients(self.G, keep, self.intercept)
            )
            # The merge fits the maps, not the consumer's output: keep it where it serves the output better
            # on the calibration rows it was fitted on (held-out rows only measure the result).
            if fit.consumer_error(self.P_fit, self.ref_fit, keep, *merged) < fit.consumer_error(
                self.P_fit, self.ref_fit, keep, W_new, b_new
            ):
                (W_new, b_new), how = merged, "channels"
        return W_new, b_new, fit.consumer_error(self.P, self.ref, keep, W_new, b_new), how


def set_consumer(
    consumer: gs.Node,
    M: int,
    W_new: np.ndarray,
    b_new: np.ndarray | None,
    prefix: str,
    rows: dict[str, np.ndarray],
    what: str = "next",
) -> None:
    """Replace the consumer's weight (and bias) in place by the fitted ones on its kept input channels; if
    an earlier candidate already kept some of its filters (`rows`), only those rows of the fit."""
    shape = tuple(int(d) for d in consumer.inputs[1].shape)
    S, k, N = W_new.shape
    if consumer.op == "Conv":
        sub = rows.get(consumer.name)
        if sub is not None:
            W_new, N = W_new[:, :, sub], len(sub)
            b_new = None if b_new is None else b_new[sub]
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
        new_name(prefix, f"{what}_W"), np.ascontiguousarray(weight, dtype=np.float32)
    )
    if b_new is not None:
        b = gs.Constant(new_name(prefix, f"{what}_B"), np.ascontiguousarray(b_new, dtype=np.float32))
        if len(consumer.inputs) > 2:
            consumer.inputs[2] = b
        else:
            consumer.inputs.append(b)


def slice_filters(node: gs.Node, keep: np.ndarray, M: int, prefix: str, rows: dict[str, np.ndarray]) -> None:
    """Keep the filters `keep` of a producer Conv of M filters, in place."""
    W = constant_value(node.inputs[1])
    if W.shape[0] != M or node.name in rows:
        raise ValueError(f"{node.name} has {W.shape[0]} filters, expected {M} (pruned twice?)")
    node.inputs[1] = gs.Constant(new_name(prefix, f"{node.name}_W"), np.ascontiguousarray(W[keep]))
    if has_bias(node):
        bias = constant_value(node.inputs[2]).reshape(-1)
        node.inputs[2] = gs.Constant(new_name(prefix, f"{node.name}_B"), np.ascontiguousarray(bias[keep]))
    rows[node.name] = keep


def slice_batchnorm(bn: gs.Node, keep: np.ndarray, C: int, prefix: str) -> None:
    for i in range(1, 1 + BN_PARAMS):
        value = constant_value(bn.inputs[i])
        if value.shape[0] != C:
            raise ValueError(f"BatchNormalization {bn.name} has {value.shape[0]} channels, expected {C}")
        bn.inputs[i] = gs.Constant(new_name(prefix, f"{bn.name}_{i}"), np.ascontiguousarray(value[keep]))


def slice_depthwise(node: gs.Node, keep: np.ndarray, C: int, prefix: str) -> None:
    """Keep the channels `keep` of a depthwise Conv of C channels (its filters, bias and group), in place."""
    W = constant_value(node.inputs[1])
    if W.shape[0] != C or int(node.attrs.get("group", 1)) != C:
        raise ValueError(f"depthwise Conv {node.name} has {W.shape[0]} channels, expected {C}")
    node.inputs[1] = gs.Constant(new_name(prefix, f"{node.name}_W"), np.ascontiguousarray(W[keep]))
    if has_bias(node):
        bias = constant_value(node.inputs[2]).reshape(-1)
        node.inputs[2] = gs.Constant(new_name(prefix, f"{node.name}_B"), np.ascontiguousarray(bias[keep]))
    node.attrs["group"] = len(keep)


# ------------------------------------------------------------------------------------------- groups


def _nodes(graph: gs.Graph) -> dict[str, gs.Node]:
    return {n.name: n for n in graph.nodes}


def _blocks(group: Group, ctx: PassContext, half: slice) -> list[np.ndarray]:
    """The group's M channels in every tensor a consumer reads: one [n, M, H, W] block per offset."""
    seen = {}
    for r in group.consumers:
        for o in r.offsets:
            seen[(r.tensor, o)] = ctx.activations[r.tensor][half][:, o : o + group.M]
    return list(seen.values())


def joint_order(criterion: str, group: Group, fits: dict[str, ConsumerFit], ctx: PassContext) -> np.ndarray:
    """The group's channels, most important first (module doc); `fits` by consumer name."""
    M, nodes = group.M, _nodes(ctx.graph)
    if criterion == "l1":
        score = np.zeros(M)
        for name in group.producers:
            W = np.abs(constant_value(nodes[name].inputs[1])).reshape(M, -1).sum(axis=1)
            score += W / max(float(W.sum()), 1e-30)
        return np.argsort(-score, kind="stable")
    blocks = _blocks(group, ctx, slice(0, None, 2))
    if criterion == "apoz":
        zeros = np.mean([(B <= 0).mean(axis=(0, 2, 3)) for B in blocks], axis=0)
        return np.argsort(zeros, kind="stable")
    G = np.zeros((M + 1, M + 1))
    for B in blocks:
        g = channel_gram(B)
        G += g / max(float(np.trace(g)) / len(g), 1e-30)
    energy = np.zeros(M)
    for r in group.consumers:
        e = np.square(fits[r.name].Wc.astype(np.float64)).sum(axis=(1, 2))
        e /= max(float(e.sum()), 1e-30)
        for o in r.offsets:
            energy += e[o : o + M]
    return fit.merge_order(G, energy)


def joint_counts(widths: tuple[int, ...], counts) -> list[tuple[int, ...]]:
    """Channels each group keeps, per option, fewest first: `counts(M)` for one group; for several, the
    same fractions of each (filter_prune.KEEP_FRACTIONS, given as counts(M) of M = 32 * 31)."""
    if len(widths) == 1:
        return [(k,) for k in counts(widths[0])]
    scale = 32 * 31
    fractions = [k / scale for k in counts(scale)]
    options = {tuple(max(1, min(M, round(f * M))) for M in widths) for f in fractions}
    options.discard(tuple(widths))
    return sorted(options, key=sum)


def group_cost(
    joint: Joint, ctx: PassContext, keeps: list[np.ndarray], biases: list[np.ndarray | None] | None
) -> tuple[int, int]:
    """(parameters, FLOPs) of the producers, BatchNormalizations, depthwise Convs and consumers when group
    g keeps keeps[g]; `biases`: the consumers' new biases (None: count the biases they have now)."""
    nodes, widths = _nodes(ctx.graph), joint.widths
    gains_bias = {r.name: b is not None for r, b in zip(joint.consumers, biases or [], strict=False)}
    cols = {r.name: len(r.kept(keeps, widths)) for r in joint.consumers}
    rows = {name: len(keeps[g]) for g, group in enumerate(joint.groups) for name in group.producers}
    params = sum(BN_PARAMS * len(bn.kept(keeps, widths)) for bn in joint.batchnorms)
    flops = 0
    for dw in joint.depthwise:
        node = nodes[dw.name]
        C, _, kh, kw = (int(d) for d in node.inputs[1].shape)
        c = len(dw.kept(keeps, widths))
        params += c * kh * kw + (c if has_bias(node) else 0)
        out = ctx.shapes.get(node.outputs[0].name)
        if out:
            flops += 2 * int(np.prod(out)) // C * c * kh * kw
    convs = dict.fromkeys(joint.producers) | {r.name: None for r in joint.consumers if r.op == "Conv"}
    for name in convs:
        node = nodes[name]
        N, C, kh, kw = (int(d) for d in node.inputs[1].shape)
        n, c = rows.get(name, N), cols.get(name, C)
        params += n * c * kh * kw + (n if has_bias(node) or gains_bias.get(name, False) else 0)
        out = ctx.shapes.get(node.outputs[0].name)
        if out:
            flops += 2 * int(np.prod(out)) // N * n * c * kh * kw
    for r in joint.consumers:
        if r.op == "Conv":
            continue
        node = nodes[r.name]
        w = tuple(int(d) for d in node.inputs[1].shape)
        transB = node.op == "Gemm" and node.attrs.get("transB", 0)
        K, N = (w[1], w[0]) if transB else (w[0], w[1])
        per_channel = K // r.channels
        had = node.op != "MatMul" and len(node.inputs) > 2 and bool(node.inputs[2].name)
        params += cols[r.name] * per_channel * N + (N if had or gains_bias.get(r.name, False) else 0)
        z = ctx.shapes.get(node.outputs[0].name)
        if z:
            flops += 2 * int(np.prod(z)) * cols[r.name] * per_channel
    return params, flops


def group_options(
    joint: Joint, ctx: PassContext, criterion: str, reconstruct: bool, counts, floor: float
) -> list[Option]:
    """The candidate's options, fewest channels kept first (see the module doc); `counts(M)`: the numbers
    of channels a group of M may keep."""
    nodes, widths = _nodes(ctx.graph), joint.widths
    fits = {}
    for r in joint.consumers:
        Y = ctx.activations.get(r.tensor)
        if Y is None or len(Y) < 2:
            raise Decline("needs calibration activations of at least 2 images (fit and held-out)")
        fits[r.name] = ConsumerFit(nodes[r.name], r.channels, Y, ctx, reconstruct)
    orders = [joint_order(criterion, group, fits, ctx) for group in joint.groups]
    options = []
    for ks in joint_counts(widths, counts):
        keeps = [np.sort(order[:k]) for order, k in zip(orders, ks, strict=True)]
        solved = {r.name: fits[r.name].solve(r.kept(keeps, widths)) for r in joint.consumers}
        err = max(s[2] for s in solved.values())
        params, flops = group_cost(joint, ctx, keeps, [solved[r.name][1] for r in joint.consumers])
        arrays = [
            a for W, b, _, _ in solved.values() for a in (W, np.zeros(0, np.float32) if b is None else b)
        ]
        single = len(keeps) == 1
        options.append(
            Option(
                est_error=err,
                params_after=params,
                bytes_after=4 * params,
                flops_after=flops,
                emit=_group_emitter(joint, keeps, ctx.park(*arrays)),
                detail={
                    "kept_filters": ks[0] if single else sum(ks),
                    "of": widths[0] if single else sum(widths),
                    "criterion": criterion,
                    "reconstructed": reconstruct,
                    "fit": {name: s[3] for name, s in solved.items()},
                    "producers": list(joint.producers),
                    "consumers": [r.name for r in joint.consumers],
                    "consumer_errors": {name: s[2] for name, s in solved.items()},
                    "joins": [j for g in joint.groups for j in g.joins],
                    "concats": list(dict.fromkeys(c for g in joint.groups for c in g.concats)),
                    "kept": keeps[0].tolist() if single else [k.tolist() for k in keeps],
                },
            )
        )
        if err <= floor:
            break
    return options


def _group_emitter(joint: Joint, keeps: list[np.ndarray], load):
    widths = joint.widths

    def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
        arrays = load()
        nodes, rows = _nodes(graph), kept_rows(graph)

        def get(name: str) -> gs.Node:
            if name not in nodes:
                raise ValueError(f"{name} is no longer in the graph (rewritten by another candidate first?)")
            return nodes[name]

        for i, r in enumerate(joint.consumers):  # columns first: a consumer may also be a producer
            W_new, b_new = arrays[2 * i], arrays[2 * i + 1]
            set_consumer(get(r.name), r.channels, W_new, b_new if b_new.size else None, prefix, rows, r.name)
        for g, group in enumerate(joint.groups):
            for name in group.producers:
                slice_filters(get(name), keeps[g], group.M, prefix, rows)
            for name, i in group.constants:
                join = get(name)
                value = constant_value(join.inputs[i])
                axis = value.ndim - 3  # [M, 1, 1] or [1, M, 1, 1]
                sliced = np.ascontiguousarray(np.take(value, keeps[g], axis=axis))
                join.inputs[i] = gs.Constant(new_name(prefix, f"{name}_{i}"), sliced)
        for bn in joint.batchnorms:
            slice_batchnorm(get(bn.name), bn.kept(keeps, widths), bn.channels, prefix)
        for dw in joint.depthwise:
            slice_depthwise(get(dw.name), dw.kept(keeps, widths), dw.channels, prefix)
        tensors = graph.tensors()
        for name in joint.tensors:  # their channel count changed: let shape inference say it again
            tensors[name].shape = None
        return [nodes[name] for name in joint.producers]

    return emit
