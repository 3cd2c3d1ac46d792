"""The pass manager: plan every rewrite, apply, verify against the budget, roll back until it holds.

1. Plan: each pass, in order, claims the nodes it matches; `check` declines with a reason, `options` lists
   the ways to rewrite a node (lossy options whose estimated error is over the budget are dropped).
2. Apply the chosen option of every candidate to a fresh copy of the original graph, pass by pass; after
   each pass: cleanup, toposort, onnx.checker, shape inference.
3. Verify the whole model against the original. While over budget, the applied rewrite with the largest
   estimated error steps back to its next less lossy option, or is undone when it has none. The result is
   never over budget; if every rewrite had to be undone, BudgetError says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from onnxopt.analysis import tensor_shapes
from onnxopt.budget import Budget
from onnxopt.data import Feeds
from onnxopt.errors import BudgetError, OnnxoptError
from onnxopt.graph import finish, graph_names_ok, name_nodes, tidy
from onnxopt.rewrite import Decline, Option, Pass, PassContext, Record, provenance
from onnxopt.verify import extra_outputs, run_model

MAX_ACTIVATION_SAMPLES = 128


@dataclass
class Candidate:
    """A node some pass can rewrite, its options (most compressive first) and the one now chosen."""

    pass_index: int
    record: Record
    options: list[Option]
    choice: int = 0
    steps: list[str] = field(default_factory=list)  # why it stepped back or was undone

    @property
    def active(self) -> bool:
        return self.choice < len(self.options)

    @property
    def option(self) -> Option:
        return self.options[self.choice]


@dataclass
class Result:
    """The optimized model, what happened to every node, and the final verification."""

    model: onnx.ModelProto
    records: list[Record]
    changed: bool
    verification: dict
    messages: list[str] = field(default_factory=list)


def _consumers(graph: gs.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        for t in node.inputs:
            counts[t.name] = counts.get(t.name, 0) + 1
    return counts


def _capture(model: onnx.ModelProto, feeds: Feeds, names: set[str]) -> dict[str, np.ndarray]:
    """Calibration values of the named tensors in the original model."""
    inputs = {k: v for k, v in feeds.items() if k in names}
    wanted = sorted(names - set(inputs))
    if not wanted:
        return inputs
    few = {k: v[:MAX_ACTIVATION_SAMPLES] for k, v in feeds.items()}
    with extra_outputs(model, wanted) as m:
        values = run_model(m, few, outputs=wanted)
    return {**inputs, **{k: v for k, v in values.items() if k in names}}


def plan(
    model: onnx.ModelProto,
    passes: list[Pass],
    feeds: Feeds,
    max_error: float,
    settings: dict[str, dict[str, str]],
    dims: dict[str, int] | None = None,
    progress: bool = False,
) -> tuple[list[Candidate], list[Record]]:
    """Candidates (rewritable nodes with options) and records of the declined nodes."""
    graph = gs.import_onnx(model)
    shapes = tensor_shapes(model, dims)
    consumers = _consumers(graph)
    declined: list[Record] = []
    claimed: set[str] = set()
    pending: list[tuple[int, Pass, gs.Node, PassContext]] = []
    for i, p in enumerate(passes):
        ctx = PassContext(graph, shapes, max_error, settings.get(p.name, {}), consumers=consumers)
        for node in graph.nodes:
            if node.name in claimed or not p.match(node):
                continue
            reason = p.check(node, ctx)
            if reason:
                declined.append(Record(p.name, node.name, node.op, "declined", reason))
            else:
                claimed.add(node.name)
                pending.append((i, p, node, ctx))
    wanted = {t for _, p, node, _ in pending for t in p.activations_needed(node)}
    activations = _capture(model, feeds, wanted) if wanted else {}
    candidates = []
    for i, p, node, ctx in tqdm(pending, desc="planning", disable=not progress, leave=False):
        ctx.activations = activations
        try:
            options = p.options(node, ctx)
        except Decline as d:
            declined.append(Record(p.name, node.name, node.op, "declined", str(d)))
            continue
        if p.lossy:
            fits = [o for o in options if o.est_error <= max_error]
            if not fits:
                best = min((o.est_error for o in options), default=float("nan"))
                why = f"no option within the error budget {max_error:g} (best estimated error {best:.3g})"
                declined.append(Record(p.name, node.name, node.op, "declined", why))
                continue
            options = fits
        before = _node_cost(node, ctx)
        rec = Record(p.name, node.name, node.op, "applied", **before)
        candidates.append(Candidate(i, rec, options))
    return candidates, declined


def _node_cost(node: gs.Node, ctx: PassContext) -> dict[str, int]:
    from onnxopt.analysis import FLOP_RULES

    params = nbytes = 0
    for t in node.inputs:
        if isinstance(t, gs.Constant):  # shape and dtype only: no need to load the weights
            numel = int(np.prod(t.shape))
            params += numel
            nbytes += numel * np.dtype(t.dtype).itemsize
    rule = FLOP_RULES.get(node.op)
    flops = 0
    if rule:
        flops = int(
            rule([t.name for t in node.inputs], [t.name for t in node.outputs], node.attrs, ctx.shapes)
        )
    return {"params_before": params, "bytes_before": nbytes, "flops_before": flops}


def build(model: onnx.ModelProto, passes: list[Pass], candidates: list[Candidate]) -> onnx.ModelProto:
    """Apply every active candidate's chosen option to a fresh copy of `model`, pass by pass."""
    current = model
    for i, p in enumerate(passes):
        chosen = [c for c in candidates if c.pass_index == i and c.active]
        if not chosen:
            continue
        graph = gs.import_onnx(current)
        nodes = {n.name: n for n in graph.nodes}
        for c in chosen:
            node = nodes[c.record.node]
            prefix = f"{node.name}/{p.name}"
            try:
                emitted = c.option.emit(graph, node, prefix)
            except Exception as e:  # a bug in a pass must not pass silently as a valid model
                raise OnnxoptError(f"pass {p.name} failed to rewrite node {node.name}: {e}") from e
            c.record.new_nodes = [n.name for n in emitted]
        try:
            current = finish(tidy(graph), model)
        except Exception as e:
            raise OnnxoptError(f"pass {p.name} broke the graph: {e}") from e
    return current


def _finalise(c: Candidate) -> Record:
    r = c.record
    if c.active:
        o = c.option
        r.status, r.est_error, r.detail = "applied", o.est_error, dict(o.detail)
        r.params_after, r.bytes_after, r.flops_after = o.params_after, o.bytes_after, o.flops_after
    else:
        r.status, r.new_nodes = "undone", []
        r.params_after, r.bytes_after, r.flops_after = r.params_before, r.bytes_before, r.flops_before
    if c.steps:
        r.reason = "; ".join(c.steps)
    return r


def optimize(
    model: onnx.ModelProto,
    passes: list[Pass],
    feeds: Feeds,
    budget: Budget,
    max_error: float = 1e-2,
    settings: dict[str, dict[str, str]] | None = None,
    dims: dict[str, int] | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> Result:
    """Optimize `model` with `passes` under `budget`. The input proto is not modified: it is copied if its
    nodes need names (`graph.name_nodes` beforehand avoids that copy of a large model)."""

    original = model
    if not graph_names_ok(model):
        original = onnx.ModelProto()
        original.CopyFrom(model)
        name_nodes(original)
    candidates, declined = plan(original, passes, feeds, max_error, settings or {}, dims, progress)
    if not candidates:
        msg = "nothing to rewrite: no node fits the selected methods; the model is returned unchanged"
        return Result(model, declined, False, budget.baseline(), [msg])
    log(f"{len(candidates)} rewrite candidates; verifying against the budget ({budget.describe()})")
    last_summary = "not measured"
    bar = tqdm(
        desc="verifying", disable=not progress, leave=False, total=sum(len(c.options) for c in candidates)
    )
    while True:
        active = [c for c in candidates if c.active]
        if not active:
            bar.close()
            raise BudgetError(
                f"no rewrite fits the budget ({budget.describe()}): every one of {len(candidates)} candidate "
                f"rewrites had to be undone; last measurement: {last_summary}"
            )
        optimized = None  # release the previous attempt before building the next one
        optimized = build(original, passes, candidates)
        ok, summary = budget.check(optimized)
        bar.update(1)
        if ok:
            break
        last_summary = budget.summarise(summary)
        worst = max(active, key=lambda c: (c.option.est_error, c.record.node))
        worst.choice += 1
        what = "stepped back to a less lossy option" if worst.active else "undone"
        worst.steps.append(
            f"{what}: model over budget ({last_summary}) with estimated error "
            f"{worst.options[worst.choice - 1].est_error:.3g} the largest"
        )
        log(f"over budget ({last_summary}); {worst.record.node}: {what}")
    bar.close()
    records = [_finalise(c) for c in candidates]
    provenance(optimized, records)
    return Result(optimized, records + declined, True, summary)
