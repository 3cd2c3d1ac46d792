"""filter_prune's channel groups: the Convs whose filters must be removed together, and every reader.

A residual stream is one set of channels written by several Convs: y = conv_b(...) + shortcut, with the
shortcut a projection Conv or the stream itself (an identity), chained through the blocks of a stage.
Removing channel c from the stream means removing filter c from every Conv that writes into it (the
producers) and input channel c from every layer that reads it (the consumers); channel-wise ops in between
(BatchNormalization, activations, pools, elementwise joins of same-channel tensors such as Add, Mul, Sub)
keep the index, and a BatchNormalization's parameters are sliced.

`find_group` starts from one Conv's output and closes the set of tensors sharing its channel index (the
root space, M channels). Forward through every reader: channel-wise ops and joins extend the set (so do
Resize by constant spatial scales and depthwise Convs, whose filters are sliced; a join's scalar constant
stays, a per-channel one is sliced), Convs and Flatten(axis=1) -> Gemm/MatMul are consumers, a
channel-axis Concat shifts the index. Backward through every producer of a tensor in the set: a joined
operand must lose the same channels, so its producer is a Conv, which joins the group, or a channel-wise
op whose input joins the set. A Concat's output holds the group's channels at the offsets o of its group
inputs: channel c of the root space is channel o + c there. Concatenated tensors are followed forward
through channel-wise ops and BatchNormalization to their consumers; a join or a second Concat after a
Concat is not followed.

Declined, with the reason: a tensor of the group that is a graph output or whose channel count is unknown;
a stream fed by a graph input (an identity shortcut from the input) or by a constant that is not per
channel; a producer that is not a prunable Conv (grouped, shared or non-constant weight); a consumer that
cannot lose input channels; any other reader (Reshape, Slice, Transpose, ConvTranspose, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.passes.filter_graph import (
    BN_PARAMS,
    CHANNEL_WISE,
    _conv_consumer_problem,
    _dense_consumer_problem,
    _weight_ok,
)
from onnxopt.rewrite import constant_value

# Elementwise ops of several inputs whose output channel c depends on channel c of each input only.
JOINS = {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min"}


@dataclass(frozen=True)
class Reader:
    """A consumer (Conv, Gemm or MatMul) or BatchNormalization reading the group's channels."""

    name: str
    op: str
    tensor: str  # the 4-D NCHW tensor whose channels it reads (before Flatten for Gemm/MatMul)
    offsets: tuple[int, ...]  # where the root channels sit in that tensor: channel c is o + c
    channels: int  # that tensor's channel count


@dataclass(frozen=True)
class Group:
    """The Convs pruned together (graph order: the first is the candidate), their readers, and the tensors
    whose channel count changes."""

    M: int
    producers: tuple[str, ...]
    consumers: tuple[Reader, ...]
    batchnorms: tuple[Reader, ...]
    tensors: tuple[str, ...]
    joins: tuple[str, ...]  # the Add/Mul/... nodes (for the record)
    concats: tuple[str, ...]
    constants: tuple[tuple[str, int], ...] = ()  # (join, input index): per-channel constants, sliced
    depthwise: tuple[Reader, ...] = ()  # depthwise Convs in between: channel-wise, their filters sliced

    @property
    def anchor(self) -> str:
        return self.producers[0]


def _producer_problem(node: gs.Node, consumers: dict[str, int]) -> str | None:
    if node.attrs.get("group", 1) != 1:
        return f"group={node.attrs['group']}"
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"auto_pad={node.attrs['auto_pad']}"
    return _weight_ok(node, 4, consumers)


def _bn_problem(node: gs.Node) -> str | None:
    params = node.inputs[1 : 1 + BN_PARAMS]
    if len(params) != BN_PARAMS or not all(isinstance(p, gs.Constant) for p in params):
        return f"BatchNormalization {node.name} has non-constant parameters"
    if any(o.name for o in node.outputs[1:]):
        return f"BatchNormalization {node.name} has training outputs"
    return None


def channel_wise(node: gs.Node) -> bool:
    """Output channel c depends on input channel c alone: CHANNEL_WISE, or a Resize/Upsample whose constant
    scales keep N and C (no `sizes`, which would name the channel count)."""
    if node.op in CHANNEL_WISE:
        return True
    if node.op not in ("Resize", "Upsample"):
        return False
    at = 2 if node.op == "Resize" else 1
    if len(node.inputs) > 3 and node.inputs[3].name:
        return False
    scales = node.inputs[at] if len(node.inputs) > at else None
    if not isinstance(scales, gs.Constant):
        return False
    v = constant_value(scales).reshape(-1)
    return len(v) == 4 and v[0] == 1 and v[1] == 1


def is_depthwise(node: gs.Node) -> bool:
    """A Conv of one filter per input channel (group = C = M): channel-wise, with per-channel filters."""
    group = int(node.attrs.get("group", 1))
    w = node.inputs[1].shape if len(node.inputs) > 1 else None
    return group > 1 and w is not None and len(w) == 4 and int(w[0]) == group and int(w[1]) == 1


class _Walk:
    def __init__(self, conv: gs.Node, graph: gs.Graph, consumers: dict[str, int], shapes: dict) -> None:
        self.graph_outputs = {t.name for t in graph.outputs}
        self.order = {n.name: i for i, n in enumerate(graph.nodes)}
        self.uses = consumers
        self.shapes = shapes
        self.M = int(conv.inputs[1].shape[0])
        self.root: dict[str, gs.Tensor] = {}
        self.queue: list[gs.Tensor] = []
        self.producers: dict[str, gs.Node] = {}
        self.consumers: dict[str, Reader] = {}
        self.batchnorms: dict[str, Reader] = {}
        self.joins: set[str] = set()
        self.concats: dict[str, gs.Node] = {}
        self.tensors: list[str] = []
        self.derived: list[tuple[gs.Tensor, tuple[int, ...]]] = []
        self.constants: list[tuple[str, int]] = []
        self.depthwise: dict[str, Reader] = {}

    def channels(self, t: gs.Tensor) -> int | None:
        shape = self.shapes.get(t.name)
        return int(shape[1]) if shape is not None and len(shape) == 4 else None

    def add(self, t: gs.Tensor) -> str | None:
        if t.name in self.root:
            return None
        if self.channels(t) != self.M:
            return f"{t.name} is not known to be a 4-D tensor of the group's {self.M} channels"
        self.root[t.name] = t
        self.queue.append(t)
        self.tensors.append(t.name)
        return None

    def depthwise_problem(self, node: gs.Node) -> str | None:
        if problem := _weight_ok(node, 4, self.uses):
            return f"the depthwise Conv {node.name} cannot lose channels: {problem}"
        return None

    def constant(self, join: gs.Node, i: int) -> str | None:
        """A constant operand of a join: a scalar stays, one value per channel ([M, 1, 1] or [1, M, 1, 1])
        is sliced with the channels, anything else cannot follow them."""
        shape = tuple(int(d) for d in join.inputs[i].shape)
        if int(np.prod(shape)) == 1:
            return None
        full = (1,) * (4 - len(shape)) + shape
        if len(full) == 4 and full[1] == self.M and full[0] == full[2] == full[3] == 1:
            self.constants.append((join.name, i))
            return None
        return f"its constant operand {join.inputs[i].name} {list(shape)} is not per channel"

    def backward(self, t: gs.Tensor) -> str | None:
        """Who writes `t`: it must lose the same channels."""
        if not t.inputs:
            return (
                f"{t.name} is a graph input joined into the group (an identity shortcut from the input): "
                "its channels cannot be removed"
            )
        p = t.inputs[0]
        if p.op == "Conv" and is_depthwise(p):
            if problem := self.depthwise_problem(p):
                return problem
            self.depthwise[p.name] = Reader(p.name, p.op, p.inputs[0].name, (0,), self.M)
            return self.add(p.inputs[0])
        if p.op == "Conv":
            if p.outputs[0] is not t:
                return f"{t.name} is not the output of Conv {p.name}"
            if problem := _producer_problem(p, self.uses):
                return f"Conv {p.name} writes into the group but cannot lose filters: {problem}"
            self.producers[p.name] = p
            return None
        if p.op == "BatchNormalization":
            if problem := _bn_problem(p):
                return problem
            self.batchnorms[p.name] = Reader(p.name, p.op, p.inputs[0].name, (0,), self.M)
            return self.add(p.inputs[0])
        if channel_wise(p):
            return self.add(p.inputs[0])
        if p.op in JOINS:
            self.joins.add(p.name)
            for i, x in enumerate(p.inputs):
                problem = self.constant(p, i) if isinstance(x, gs.Constant) else self.add(x)
                if problem:
                    return f"{p.op} {p.name}: {problem}"
            return None
        return f"{t.name} is written by {p.op} {p.name}, which cannot drop the group's channels"

    def forward(self, t: gs.Tensor, offsets: tuple[int, ...], derived: bool) -> str | None:
        """Who reads `t` (in the root space, or a concatenation holding the group at `offsets`)."""
        if t.name in self.graph_outputs:
            return f"{t.name} is a graph output (its shape would change)"
        C = self.channels(t)
        if C is None:
            return f"{t.name} is not known to be 4-D (NCHW)"
        for r in t.outputs:
            if channel_wise(r) or r.op == "BatchNormalization" or (r.op == "Conv" and is_depthwise(r)):
                if r.inputs[0] is not t:
                    return f"{t.name} is not the data input of {r.op} {r.name}"
                if r.op == "Conv":
                    if problem := self.depthwise_problem(r):
                        return problem
                    self.depthwise[r.name] = Reader(r.name, r.op, t.name, offsets, C)
                elif r.op == "BatchNormalization":
                    if problem := _bn_problem(r):
                        return problem
                    self.batchnorms[r.name] = Reader(r.name, r.op, t.name, offsets, C)
                elif any(o.name for o in r.outputs[1:]):
                    return f"{r.op} {r.name} has a second output (indices), which is not followed"
                if derived:
                    self.derived.append((r.outputs[0], offsets))
                elif problem := self.add(r.outputs[0]):
                    return problem
            elif r.op in JOINS and not derived:
                self.joins.add(r.name)
                if problem := self.add(r.outputs[0]):
                    return f"{r.op} {r.name}: {problem}"
            elif r.op == "Conv":
                if r.inputs[0] is not t:
                    return f"{t.name} is not the data input of Conv {r.name}"
                if problem := _conv_consumer_problem(r, self.uses):
                    return f"the consumer Conv {r.name} cannot lose input channels: {problem}"
                self.consumers[r.name] = Reader(r.name, "Conv", t.name, offsets, C)
            elif r.op == "Flatten" and r.attrs.get("axis", 1) == 1:
                if problem := self.dense(r, t, offsets, C):
                    return problem
            elif r.op == "Concat" and not derived and r.attrs.get("axis") in (1, -3):
                self.concats[r.name] = r
            else:
                where = "the concatenation " if derived else ""
                return f"{where}{t.name} feeds {r.op} {r.name}, which the channel group does not follow"
        return None

    def dense(self, flatten: gs.Node, t: gs.Tensor, offsets: tuple[int, ...], C: int) -> str | None:
        flat = flatten.outputs[0]
        if flat.name in self.graph_outputs or len(flat.outputs) != 1:
            return f"Flatten {flatten.name}'s output must feed exactly one Gemm/MatMul"
        dense = flat.outputs[0]
        if dense.op not in ("Gemm", "MatMul") or dense.inputs[0] is not flat:
            return f"Flatten {flatten.name} feeds {dense.op} {dense.name}, not Gemm/MatMul"
        if problem := _dense_consumer_problem(dense, self.uses):
            return f"the consumer {dense.op} {dense.name} cannot lose input rows: {problem}"
        self.consumers[dense.name] = Reader(dense.name, dense.op, t.name, offsets, C)
        self.tensors.append(flat.name)
        return None

    def concat(self, cat: gs.Node) -> str | None:
        starts, at = [], 0
        for x in cat.inputs:
            c = self.channels(x)
            if c is None:
                return f"Concat {cat.name}: {x.name} is not known to be 4-D"
            starts.append(at)
            at += c
        offsets = tuple(s for s, x in zip(starts, cat.inputs, strict=True) if x.name in self.root)
        self.derived = [(cat.outputs[0], offsets)]
        while self.derived:
            t, offs = self.derived.pop()
            self.tensors.append(t.name)
            if problem := self.forward(t, offs, derived=True):
                return f"after Concat {cat.name}: {problem}"
        return None

    def run(self, conv: gs.Node) -> Group | str:
        self.producers[conv.name] = conv
        if problem := self.add(conv.outputs[0]):
            return problem
        while self.queue:
            t = self.queue.pop()
            if (problem := self.backward(t)) or (problem := self.forward(t, (0,), derived=False)):
                return problem
        for cat in self.concats.values():
            if problem := self.concat(cat):
                return problem
        if not self.consumers:
            return "no layer reads the group's channels"
        by_order = lambda names: tuple(sorted(names, key=self.order.__getitem__))  # noqa: E731
        return Group(
            self.M,
            by_order(self.producers),
            tuple(self.consumers[n] for n in by_order(self.consumers)),
            tuple(self.batchnorms[n] for n in by_order(self.batchnorms)),
            tuple(dict.fromkeys(self.tensors)),
            by_order(self.joins),
            by_order(self.concats),
            tuple(self.constants),
            tuple(self.depthwise[n] for n in by_order(self.depthwise)),
        )


def find_group(conv: gs.Node, graph: gs.Graph, consumers: dict[str, int], shapes: dict) -> Group | str:
    """The channel group of `conv`'s filters (module doc), or why it cannot be pruned."""
    return _Walk(conv, graph, consumers, shapes).run(conv)


@dataclass(frozen=True)
class Shared:
    """A node reading the channels of one or several groups (a Concat of several groups' outputs):
    `parts` says where each group's channels sit in the tensor it reads, as (group index, offsets)."""

    name: str
    op: str
    tensor: str
    channels: int
    parts: tuple[tuple[int, tuple[int, ...]], ...]

    def kept(self, keeps: list[np.ndarray], Ms: tuple[int, ...]) -> np.ndarray:
        """Its kept channels (of `channels`) when group g keeps keeps[g] of Ms[g]."""
        gone = [o + np.setdiff1d(np.arange(Ms[g]), keeps[g]) for g, offsets in self.parts for o in offsets]
        return np.setdiff1d(np.arange(self.channels), np.concatenate(gone) if gone else np.zeros(0, int))


@dataclass(frozen=True)
class Joint:
    """Groups pruned as one candidate because they share readers (inputs of one Concat); a single group is
    a Joint of one. Each group keeps its own channels; a shared reader loses all of theirs."""

    groups: tuple[Group, ...]
    producers: tuple[str, ...]  # every group's, graph order: the first is the candidate
    consumers: tuple[Shared, ...]
    batchnorms: tuple[Shared, ...]
    depthwise: tuple[Shared, ...]
    tensors: tuple[str, ...]

    @property
    def anchor(self) -> str:
        return self.producers[0]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(g.M for g in self.groups)


def _shared(groups: list[Group], field: str, order: dict[str, int]) -> tuple[Shared, ...]:
    merged: dict[str, tuple[Reader, list]] = {}
    for g, group in enumerate(groups):
        for r in getattr(group, field):
            merged.setdefault(r.name, (r, []))[1].append((g, r.offsets))
    names = sorted(merged, key=order.__getitem__)
    return tuple(
        Shared(n, merged[n][0].op, merged[n][0].tensor, merged[n][0].channels, tuple(merged[n][1]))
        for n in names
    )


def _source_conv(t: gs.Tensor) -> gs.Node | None:
    """The Conv that writes `t` through channel-wise ops and joins, if any (the start of its group)."""
    for _ in range(64):
        if not t.inputs:
            return None
        p = t.inputs[0]
        if p.op == "Conv" and not is_depthwise(p):
            return p
        if not (channel_wise(p) or p.op in JOINS or p.op == "BatchNormalization" or p.op == "Conv"):
            return None
        t = next((x for x in p.inputs if not isinstance(x, gs.Constant)), None)
        if t is None:
            return None
    return None


def find_joint(conv: gs.Node, graph: gs.Graph, consumers: dict[str, int], shapes: dict) -> Joint | str:
    """`conv`'s group, joined by the groups of the other inputs of its Concats (closed under that), or why
    `conv`'s group cannot be pruned. An input whose group cannot be pruned stays as it is."""
    first = find_group(conv, graph, consumers, shapes)
    if isinstance(first, str):
        return first
    nodes = {n.name: n for n in graph.nodes}
    groups, done = [first], set(first.producers)
    i = 0
    while i < len(groups):
        mine = set().union(*(g.tensors for g in groups))
        for name in groups[i].concats:
            for x in nodes[name].inputs:
                src = None if x.name in mine else _source_conv(x)
                if src is None or src.name in done:
                    continue
                other = find_group(src, graph, consumers, shapes)
                if isinstance(other, Group) and name in other.concats:
                    groups.append(other)
                    done.update(other.producers)
        i += 1
    order = {n.name: k for k, n in enumerate(graph.nodes)}
    return Joint(
        tuple(groups),
        tuple(sorted(done, key=order.__getitem__)),
        _shared(groups, "consumers", order),
        _shared(groups, "batchnorms", order),
        _shared(groups, "depthwise", order),
        tuple(dict.fromkeys(t for g in groups for t in g.tensors)),
    )
