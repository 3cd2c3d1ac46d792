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

Where A's channels meet a residual join (Add, ...), a channel-axis Concat or several readers, the chain
cannot be followed alone: the Convs that write the same channels and every layer that reads them form a
channel group (filter_group.py), pruned as one candidate at its first producer in graph order (the other
producers are declined as part of it, the consumers owned), with a joint selection and a re-fit of every
consumer (filter_joint.py). The groups of the inputs of one Concat share its readers: they are one
candidate (filter_group.find_joint), each group keeping the same fraction of its channels. A Conv whose
filters one candidate keeps may have its input channels cut by another: whichever is applied second adapts
to the first (filter_joint.kept_rows). Two candidates never cut the input channels of one node: the second
is declined.

Settings: `filter_prune.criterion=merge|apoz|l1`, `filter_prune.reconstruct=0|1` (default 1),
`filter_prune.groups=0|1` (default 1; 0: single chains only, as before channel groups).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes import filter_fit as fit
from onnxopt.passes.convolution import has_bias
from onnxopt.passes.filter_graph import BN_PARAMS, Chain, follow
from onnxopt.passes.filter_group import Joint, find_joint
from onnxopt.passes.filter_joint import (
    ConsumerFit,
    channel_gram,
    group_cost,
    group_options,
    kept_rows,
    set_consumer,
)
from onnxopt.passes.prune import conv_problem
from onnxopt.rewrite import Decline, Option, Pass, PassContext, constant_value, new_name, replace_node

KEEP_FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 15 / 16, 31 / 32)
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
        self._groups: dict[str, Joint] = {}
        self._graph: gs.Graph | None = None
        self._edited: dict[str, str] = {}  # node whose input channels or BN parameters fall -> candidate

    def check(self, node: gs.Node, ctx: PassContext) -> str | None:
        criterion = ctx.setting("criterion", str, "merge")
        if criterion not in fit.CRITERIA:
            return f"criterion {criterion!r} is not one of {', '.join(fit.CRITERIA)}"
        if problem := conv_problem(node, ctx):
            return problem
        if int(node.inputs[1].shape[0]) < 2:
            return "a Conv with one filter has none to remove"
        if self._graph is not ctx.graph:  # a new plan: forget the previous graph's claims
            self._graph, self._edited = ctx.graph, {}
        chain = follow(node, ctx.graph, ctx.consumers)
        if isinstance(chain, str):
            return self._check_group(node, ctx) if ctx.setting("groups", _flag, True) else chain
        x = ctx.shapes.get(chain.consumer_input)
        if x is None or len(x) != 4:
            return f"the consumer's input {chain.consumer_input} is not known to be 4-D (NCHW)"
        if problem := self._claim(node.name, [chain.consumer, *chain.batchnorms]):
            return problem
        self._chains[node.name] = chain
        return None

    def _check_group(self, node: gs.Node, ctx: PassContext) -> str | None:
        """A Conv whose channels meet a join, a Concat or several readers: its channel group, anchored at
        the group's first producer (the others are declined as part of it)."""
        group = find_joint(node, ctx.graph, ctx.consumers, ctx.shapes)
        if isinstance(group, str):
            return group  # the group walk follows everything the chain does, and says more
        if group.anchor != node.name:
            others = [p for p in group.producers if p != node.name]
            named = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
            return f"its channels are shared with {named}: pruned as one group at {group.anchor}"
        edited = [r.name for r in (*group.consumers, *group.batchnorms, *group.depthwise)]
        if problem := self._claim(node.name, edited):
            return problem
        self._groups[node.name] = group
        return None

    def _claim(self, candidate: str, edited: list[str]) -> str | None:
        """Two candidates may not both cut one node's input channels (e.g. two Convs into one Concat)."""
        for name in edited:
            if name in self._edited and self._edited[name] != candidate:
                return f"{name} already loses input channels to the pruning of {self._edited[name]}"
        self._edited.update(dict.fromkeys(edited, candidate))
        return None

    def owned(self, node: gs.Node, ctx: PassContext) -> list[str]:
        if group := self._groups.get(node.name):
            return [*group.producers[1:], *(r.name for r in (*group.consumers, *group.depthwise))]
        chain = self._chains.get(node.name)
        return [chain.consumer] if chain else []

    def activations_needed(self, node: gs.Node) -> list[str]:
        if group := self._groups.get(node.name):
            return list(dict.fromkeys(r.tensor for r in group.consumers))
        chain = self._chains[node.name]
        return [chain.consumer_input] + ([chain.relu_output] if chain.relu_output else [])

    def cost(self, node: gs.Node, ctx: PassContext) -> dict[str, int]:
        if group := self._groups.get(node.name):
            params, flops = group_cost(group, ctx, [np.arange(M) for M in group.widths], None)
        else:
            M = int(node.inputs[1].shape[0])
            params, flops = _chain_cost(node, self._chains[node.name], ctx, M, None)
        return {"params_before": params, "bytes_before": 4 * params, "flops_before": flops}

    def options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        criterion = ctx.setting("criterion", str, "merge")
        reconstruct = ctx.setting("reconstruct", _flag, True)
        floor = ctx.local_tolerance * FLOOR
        if group := self._groups.get(node.name):
            return group_options(group, ctx, criterion, reconstruct, keep_counts, floor)
        chain = self._chains[node.name]
        M = int(node.inputs[1].shape[0])
        Y = ctx.activations.get(chain.consumer_input)
        if Y is None or len(Y) < 2:
            raise Decline("needs calibration activations of at least 2 images (fit and held-out)")
        G = channel_gram(Y[0::2])
        consumer = _node(ctx.graph, chain.consumer)
        fitted = ConsumerFit(consumer, M, Y, ctx, reconstruct, G)
        order = _order(criterion, node, chain, G, fitted.Wc, ctx)
        options = []
        for k in keep_counts(M):
            keep = np.sort(order[:k])
            W_new, b_new, err, how = fitted.solve(keep)
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
            if err <= floor:
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
        set_consumer(consumer, M, W_new, b_new if b_new.size else None, prefix, kept_rows(graph))
        tensors = graph.tensors()
        for name in chain.tensors:  # their channel count changed: let shape inference say it again
            tensors[name].shape = None
        return replace_node(graph, node, [pruned])

    return emit
