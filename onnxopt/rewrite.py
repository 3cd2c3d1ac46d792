"""The pass contract: match -> check -> options -> rewrite, and the per-node record.

A pass looks at one node at a time. `check` returns a reason when the node cannot be rewritten at all
(not constant, shared weight, unsupported attribute). `options` computes, with pure numpy, the ways the
node can be rewritten, ordered from most to least compressive, each with its estimated error and cost;
it raises `Decline` with a reason when none pays off. The pass manager picks an option per node, applies
it to a fresh copy of the original graph, verifies the whole model, and steps back or undoes the worst
rewrites while the model is over budget. An option's `emit` only builds nodes and constants; it never
computes weights, so re-applying after a rollback is cheap.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

_PARKED = itertools.count()
# A node's own relative output error is a pessimistic proxy of the model's: the layers after it (a ReLU, a
# projection to few classes) remove much of it. Rewrites up to this multiple of the budget are planned; the
# whole-model verification then decides which survive.
LOCAL_SLACK = 8.0


class Decline(Exception):
    """Raised by `Pass.options` when a node cannot be rewritten profitably; the message is the reason."""


@dataclass
class Record:
    """What happened to one node: method, cost before and after, estimated error, and why."""

    method: str
    node: str
    op_type: str
    status: str  # "applied", "declined" or "undone"
    reason: str = ""
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    est_error: float = 0.0
    detail: dict = field(default_factory=dict)
    new_nodes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Option:
    """One way to rewrite a node. `emit(graph, node, prefix)` replaces the node and returns the new nodes."""

    est_error: float
    params_after: int
    bytes_after: int
    flops_after: int
    emit: Callable[[gs.Graph, gs.Node, str], list[gs.Node]]
    detail: dict = field(default_factory=dict)
    # The same function in a form chosen only because it was timed faster per layer (prune's sparse ops):
    # `fallback` is the other form. If the whole model is not faster, the manager swaps it in.
    fallback: Option | None = None
    # Measured time (ms) this option saves over the node, when the pass timed it: where every option of every
    # candidate has one, the pass manager spends the budget by error per millisecond saved (energy-aware).
    ms_saved: float | None = None
    speed_only: bool = False  # worth it only for its speed: undone if the whole model is not faster


@dataclass
class PassContext:
    """What a pass may read: the original model's graph, shapes, calibration activations, budget, options."""

    graph: gs.Graph
    shapes: dict[str, tuple[int, ...]]
    max_error: float  # the model's budget (relative L2 of its outputs)
    settings: dict[str, str]
    activations: dict[str, np.ndarray] = field(default_factory=dict)
    consumers: dict[str, int] = field(default_factory=dict)  # tensor name -> number of consuming nodes
    scratch: Path | None = None  # a directory that lives as long as the options: to park large arrays on disk
    threads: int = 1  # intra-op threads the optimized model will run with (speed-only passes time at this)

    def park(self, *arrays: np.ndarray) -> Callable[[], tuple[np.ndarray, ...]]:
        """Keep `arrays` on disk (in `scratch`) rather than in memory; returns their loader. The options of a
        large model would otherwise hold arrays as large as its weights while the budget is fitted."""
        if self.scratch is None:
            return lambda: arrays
        path = self.scratch / f"{next(_PARKED)}.npz"
        np.savez(path, *arrays)

        def load() -> tuple[np.ndarray, ...]:
            with np.load(path) as z:
                return tuple(z[f"arr_{i}"] for i in range(len(arrays)))

        return load

    @property
    def local_tolerance(self) -> float:
        """The largest estimated error of one node's rewrite worth trying (see LOCAL_SLACK)."""
        return self.max_error * LOCAL_SLACK

    def setting(self, key: str, cast: Callable = str, default=None):
        """A user setting for this pass (`--set method.key=value`), cast, or `default`."""
        return cast(self.settings[key]) if key in self.settings else default


def constant_value(tensor: gs.Constant) -> np.ndarray:
    """A constant's value without caching it in the graph: graphsurgeon keeps a loaded value for the graph's
    lifetime, which would hold a second copy of every weight of a large model while it is planned."""
    lazy = tensor._values
    return lazy.load() if isinstance(lazy, LazyValues) else np.asarray(lazy)


def weight_problem(node: gs.Node, index: int = 1) -> str | None:
    """Why input `index` of `node` is not a constant float32 weight, or None (reads no weight data)."""
    if len(node.inputs) <= index or not isinstance(node.inputs[index], gs.Constant):
        return "weight is not a constant initializer"
    dtype = np.dtype(node.inputs[index].dtype)
    return None if dtype == np.float32 else f"weight dtype {dtype} is not float32"


class Pass(ABC):
    """One compression method. Subclasses set the class attributes and implement check and options."""

    name: str = ""
    op_types: tuple[str, ...] = ()
    lossy: bool = True
    default: bool = True  # part of the default method set
    summary: str = ""
    custom_ops: tuple[str, ...] = ()
    # Speed-only (exact) passes keep a rewrite only where it is timed faster (onnxopt.timing); the pass
    # manager then also times the whole model and undoes their rewrites if it is not faster as a whole.
    measured: bool = False

    def match(self, node: gs.Node) -> bool:
        return node.op in self.op_types

    @abstractmethod
    def check(self, node: gs.Node, ctx: PassContext) -> str | None:
        """None if the node can be rewritten, else the reason it cannot."""

    def activations_needed(self, node: gs.Node) -> list[str]:
        """Names of tensors whose calibration values `options` wants in ctx.activations."""
        return []

    def owned(self, node: gs.Node, ctx: PassContext) -> list[str]:
        """Names of other nodes this node's rewrite also changes (called after `check` accepted it): no
        later pass may claim them, since its options would be computed on what this rewrite changes."""
        return []

    def cost(self, node: gs.Node, ctx: PassContext) -> dict[str, int] | None:
        """params_before, bytes_before and flops_before of what the rewrite touches, when that is more than
        the node itself (None: the node's own cost)."""
        return None

    @abstractmethod
    def options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        """Rewrites of the node, most compressive first; raise Decline when none pays off."""


def new_name(prefix: str, what: str) -> str:
    """Names of emitted nodes and tensors: prefix is '<source node>/<method>'."""
    return f"{prefix}/{what}"


def replace_node(graph: gs.Graph, node: gs.Node, new_nodes: list[gs.Node]) -> list[gs.Node]:
    """Put `new_nodes` in the graph in place of `node` (whose outputs they already produce)."""
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.extend(new_nodes)
    return new_nodes


def provenance(model: onnx.ModelProto, records: list[Record]) -> None:
    """Tag emitted nodes with metadata_props naming the method and the source node."""
    by_name = {n.name: n for n in model.graph.node}
    for r in records:
        if r.status != "applied":
            continue
        for name in r.new_nodes:
            node = by_name.get(name)
            if node is not None:
                del node.metadata_props[:]
                node.metadata_props.add(key="onnxopt.method", value=r.method)
                node.metadata_props.add(key="onnxopt.source", value=r.node)
