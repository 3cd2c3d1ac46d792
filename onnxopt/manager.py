"""The pass manager: plan every rewrite, apply, verify against the budget, roll back until it holds.

1. Plan: each pass, in order, claims the nodes it matches; `check` declines with a reason, `options` lists
   the ways to rewrite a node (lossy options whose estimated error is over the budget are dropped).
2. Apply the chosen option of every candidate to a fresh copy of the original graph, pass by pass; after
   each pass: cleanup, toposort, onnx.checker, shape inference.
3. Verify the whole model against the original. Over budget, the rewrites with the largest estimated error
   step back to a less lossy option, or are undone when they have none: every node takes its most
   compressive option under a threshold tau on the estimated error, and tau is bisected over the options'
   estimated errors (a few verifications, not one per option) to the largest that passes. Then a few greedy
   per-node steps: the node whose next more compressive option saves the most tries it alone and keeps it if
   the model still passes (one threshold cannot know which layers' errors the model tolerates); when no
   threshold passes at all, the steps start from every rewrite undone. The result is never over budget; if
   every rewrite had to be undone, BudgetError says why.
   Energy-aware: when every option carries a measured time saving (prune.objective=latency), tau bounds the
   estimated error per millisecond saved instead, so the budget goes where it buys the most time (Yang et
   al.'s energy-aware pruning, with measured latency as the energy estimate), and the greedy steps try the
   step that saves the most time first.
4. Model-level passes (onnxopt.model_pass: int8 quantization, which rewrites the whole graph in one call)
   run last, on the model the per-node passes produced, each verified with the same Budget object.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from onnxopt.budget import Budget
from onnxopt.data import Feeds
from onnxopt.errors import BudgetError, OnnxoptError
from onnxopt.graph import finish, is_normalized, normalize, tidy
from onnxopt.model_pass import ModelContext, ModelPass
from onnxopt.rewrite import LOCAL_SLACK, Decline, Option, Pass, PassContext, Record, provenance
from onnxopt.verify import complete_shapes, extra_outputs, run_model

MAX_ACTIVATION_SAMPLES = 256
REFINE_STEPS = 12  # verifications spent on per-node steps after the bisection


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
    scratch: Path | None = None,
    threads: int = 1,
) -> tuple[list[Candidate], list[Record]]:
    """Candidates (rewritable nodes with options) and records of the declined nodes. `scratch`: a directory
    that outlives the candidates, where passes may park large arrays."""
    graph = gs.import_onnx(model)
    shapes = complete_shapes(model, feeds, dims)
    consumers = _consumers(graph)
    declined: list[Record] = []
    claimed: set[str] = set()
    owned: dict[str, tuple[str, str]] = {}  # node -> the candidate whose rewrite also changes it (Pass.owned)
    pending: list[tuple[int, Pass, gs.Node, PassContext]] = []
    for i, p in enumerate(passes):
        ctx = PassContext(
            graph,
            shapes,
            max_error,
            settings.get(p.name, {}),
            consumers=consumers,
            scratch=scratch,
            threads=threads,
        )
        for node in graph.nodes:
            if node.name in claimed or not p.match(node):
                continue
            if node.name in owned and owned[node.name][0] != p.name:
                why = f"its rewrite by {owned[node.name][0]} of {owned[node.name][1]} changes this node"
                declined.append(Record(p.name, node.name, node.op, "declined", why))
                continue
            reason = p.check(node, ctx)
            if reason:
                declined.append(Record(p.name, node.name, node.op, "declined", reason))
            else:
                claimed.add(node.name)
                pending.append((i, p, node, ctx))
                owned.update((name, (p.name, node.name)) for name in p.owned(node, ctx))
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
            fits = [o for o in options if o.est_error <= max_error * LOCAL_SLACK]
            if not fits:
                best = min((o.est_error for o in options), default=float("nan"))
                why = (
                    f"no option within {LOCAL_SLACK:g}x the error budget {max_error:g} "
                    f"(best estimated error {best:.3g})"
                )
                declined.append(Record(p.name, node.name, node.op, "declined", why))
                continue
            options = fits
        before = p.cost(node, ctx) or _node_cost(node, ctx)
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
        # graphsurgeon's nodes and tensors reference each other: without a collection, every attempt of the
        # budget loop would keep its graph (and a large model's arrays) until the collector happens to run.
        del graph, nodes
        gc.collect()
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
    passes: list[Pass | ModelPass],
    feeds: Feeds,
    budget: Budget,
    max_error: float = 1e-2,
    settings: dict[str, dict[str, str]] | None = None,
    dims: dict[str, int] | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
    threads: int = 1,
    calibrated: bool = True,
    samples: list[Feeds] | None = None,
) -> Result:
    """Optimize `model` with `passes` under `budget`: the per-node passes first (plan, apply, fit the budget),
    then the model-level passes (onnxopt.model_pass) on their result, each within the same budget.
    `calibrated`: `feeds` are real data, not synthetic; `samples`: calibration samples of differing shapes
    for the model-level passes (default: `feeds`, one sample at a time). The input proto is not modified: it
    is copied if it needs normalizing (`graph.normalize` beforehand avoids that copy of a large model)."""
    node_passes = [p for p in passes if not isinstance(p, ModelPass)]
    model_passes = [p for p in passes if isinstance(p, ModelPass)]
    args = (feeds, budget, max_error, settings or {}, dims, progress, log, threads)
    if not model_passes:
        return _optimize_nodes(model, node_passes, *args)
    messages = []
    try:
        result = _optimize_nodes(model, node_passes, *args) if node_passes else None
    except BudgetError as e:
        result, messages = None, [f"per-node rewrites undone: {e}"]
    if result is None or not result.changed:
        normalized = model
        if not is_normalized(model):  # model-level passes name the nodes they leave alone
            normalized = onnx.ModelProto()
            normalized.CopyFrom(model)
            normalize(normalized)
        records = result.records if result else []
        result = Result(
            normalized, records, False, budget.baseline(), messages + (result.messages if result else [])
        )
    return _run_model_passes(
        result, model_passes, feeds, budget, settings or {}, calibrated, samples, threads, log
    )


def _run_model_passes(result, model_passes, feeds, budget, settings, calibrated, samples, threads, log):
    """Each model-level pass on the model so far; its records join the report. BudgetError if nothing at
    all was changed and a model-level pass had to undo its rewrites for the budget."""
    failures = []
    for mp in model_passes:
        ctx = ModelContext(feeds, budget, settings.get(mp.name, {}), calibrated, threads, log, samples)
        got = mp.run(result.model, ctx)
        result.records.extend(got.records)
        result.messages.extend(got.messages)
        if got.changed:
            result.model, result.verification, result.changed = got.model, got.verification, True
        elif got.failure:
            failures.append(f"{mp.name}: {got.failure}")
    if not result.changed and failures:
        raise BudgetError("; ".join(failures))
    return result


def _optimize_nodes(
    model: onnx.ModelProto,
    passes: list[Pass],
    feeds: Feeds,
    budget: Budget,
    max_error: float,
    settings: dict[str, dict[str, str]],
    dims: dict[str, int] | None,
    progress: bool,
    log: Callable[[str], None],
    threads: int,
) -> Result:
    """The per-node passes: plan, apply, fit the budget (see the module doc)."""
    original = model
    if not is_normalized(model):
        original = onnx.ModelProto()
        original.CopyFrom(model)
        normalize(original)
    # Passes park large arrays in `scratch`; it must outlive every build of the budget loop.
    with tempfile.TemporaryDirectory(prefix="onnxopt-") as scratch:
        candidates, declined = plan(
            original, passes, feeds, max_error, settings or {}, dims, progress, Path(scratch), threads
        )
        if not candidates:
            msg = "nothing to rewrite: no node fits the selected methods; the model is returned unchanged"
            return Result(model, declined, False, budget.baseline(), [msg])
        log(f"{len(candidates)} rewrite candidates; verifying against the budget ({budget.describe()})")
        optimized, summary, failures = _fit_budget(original, passes, candidates, budget, progress, log)
        if optimized is not None:
            optimized, summary = _keep_if_faster(
                original, optimized, summary, passes, candidates, budget, feeds, threads, settings or {}, log
            )
    if optimized is None:
        raise BudgetError(
            f"no rewrite fits the budget ({budget.describe()}): every one of {len(candidates)} candidate "
            f"rewrites had to be undone; {failures[-1][1] if failures else ''}"
        )
    for c in candidates:
        if c.choice and failures and not c.steps:  # (undone as slower: its step is already said)
            tau, why = min(failures)  # the tightest threshold that still failed
            what = f"stepped back to option {c.choice + 1} of {len(c.options)}" if c.active else "undone"
            bound = "estimated error per ms saved" if _energy_aware(candidates) else "estimated error"
            c.steps.append(
                f"{what}: with rewrites of {bound} up to {tau:.3g} the model was over budget ({why})"
            )
    records = [_finalise(c) for c in candidates]
    if not any(c.active for c in candidates):  # everything undone as slower: the input, unchanged
        return Result(model, records + declined, False, summary)
    provenance(optimized, records)
    return Result(optimized, records + declined, True, summary)


def _keep_if_faster(original, optimized, summary, passes, candidates, budget, feeds, threads, settings, log):
    """The speed-only passes' rewrites, and the options emitted in a form chosen for speed (an option with
    a `fallback`), were each timed faster alone; the whole model must be faster too, or the former are undone
    and the latter fall back to their other form (layers interact: a custom op may keep onnxruntime from
    fusing its neighbours, and a small model's time is dominated by what the layers share)."""
    from onnxopt.bench import latency
    from onnxopt.timing import MIN_GAIN

    def timed(p: Pass) -> bool:
        return p.measured and settings.get(p.name, {}).get("measure", "1") not in ("0", "false", "no")

    speed = [c for c in candidates if c.active and (timed(passes[c.pass_index]) or c.option.speed_only)]
    forms = [c for c in candidates if c.active and c.option.fallback is not None and c not in speed]
    if not speed and not forms:
        return optimized, summary
    before, after = (
        r["median_ms"] for r in latency([original, optimized], feeds, threads=threads, rounds=40)
    )
    log(f"whole model: {before:.3f} ms before, {after:.3f} ms after, at {threads} thread(s)")
    if after * MIN_GAIN <= before:  # the same margin as per layer: below it, the gain is within the noise
        return optimized, summary
    timing = f"the whole model ran {after:.3f} ms against {before:.3f} ms before, at {threads} thread(s)"
    for c in speed:
        c.choice = len(c.options)
        c.steps.append(f"undone: {timing} (needs {MIN_GAIN:g}x)")
    for c in forms:
        fallback = c.option.fallback
        c.steps.append(
            f"emitted {fallback.detail.get('emitted', 'in its other form')}: {timing} (needs {MIN_GAIN:g}x)"
        )
        c.options[c.choice] = fallback
    if not any(c.active for c in candidates):
        return original, budget.baseline()
    rebuilt = build(original, passes, candidates)
    ok, rebuilt_summary = budget.check(rebuilt)
    if not ok:  # cannot happen with exact rewrites removed, but never return a model over budget
        raise OnnxoptError(
            f"undoing the speed-only rewrites broke the budget: {budget.summarise(rebuilt_summary)}"
        )
    return rebuilt, rebuilt_summary


def _energy_aware(candidates: list[Candidate]) -> bool:
    """Every option of every candidate says how much time it saves."""
    return all(o.ms_saved is not None for c in candidates for o in c.options)


def _key(o: Option, energy: bool) -> float:
    """What tau bounds: the option's estimated error, or (energy-aware) its error per millisecond saved."""
    return o.est_error / max(o.ms_saved, 1e-6) if energy else o.est_error


def _choose(candidates: list[Candidate], tau: float) -> None:
    """Each candidate takes its most compressive option of key <= tau (see _key), or none."""
    energy = _energy_aware(candidates)
    for c in candidates:
        c.choice = next((i for i, o in enumerate(c.options) if _key(o, energy) <= tau), len(c.options))


def _fit_budget(original, passes, candidates, budget, progress, log):
    """The largest per-rewrite error threshold tau whose model passes the budget, by bisection over the
    options' estimated errors: lowering tau steps the worst rewrites back first. Returns (model, measurement,
    [(tau, why) of the failed attempts]); the model is None if no threshold with any rewrite passes."""
    energy = _energy_aware(candidates)
    taus = sorted({_key(o, energy) for c in candidates for o in c.options})
    failures: list[tuple[float, str]] = []
    best = None
    lo, hi = -1, len(taus) - 1  # taus[hi] is tried first; index -1 means every rewrite undone (the original)
    bar = tqdm(desc="verifying", disable=not progress, leave=False, total=max(1, len(taus).bit_length() + 1))
    probe = hi
    while True:
        _choose(candidates, taus[probe])
        optimized = None  # release the previous attempt before building the next one
        optimized = build(original, passes, candidates)
        ok, summary = budget.check(optimized)
        bar.update(1)
        if ok:
            best, lo = (summary, probe), probe
        else:
            failures.append((taus[probe], budget.summarise(summary)))
            log(f"tau {taus[probe]:.3g}: over budget ({failures[-1][1]})")
            hi = probe - 1
        if lo >= hi:
            break
        probe = (lo + hi + 1) // 2
    bar.close()
    if best is None:
        # Even the least lossy threshold failed, which may be one layer's doing: start from every rewrite
        # undone and let the greedy steps add the ones the model tolerates, one at a time.
        for c in candidates:
            c.choice = len(c.options)
        optimized, summary = _refine(original, passes, candidates, budget, None, None, log)
        return optimized, summary, failures
    summary, index = best
    if index != probe:  # the last attempt failed: rebuild the best one that passed (deterministic)
        _choose(candidates, taus[index])
        optimized = None
        optimized = build(original, passes, candidates)
    optimized, summary = _refine(original, passes, candidates, budget, optimized, summary, log)
    return optimized, summary, failures


def _refine(original, passes, candidates, budget, optimized, summary, log):
    """Greedy steps after the bisection. One shared threshold steps every node back alike, though layers
    differ in how much of their error reaches the outputs: the node whose next more compressive option saves
    the most bytes tries it alone, and keeps it if the whole model stays within budget; a node that fails is
    not tried again. At most REFINE_STEPS verifications."""
    tried: set[int] = set()
    saving = _next_time_saving if _energy_aware(candidates) else _next_saving
    for _ in range(REFINE_STEPS):
        movable = [c for c in candidates if c.choice > 0 and id(c) not in tried]
        if not movable:
            break
        c = max(movable, key=saving)
        c.choice -= 1
        trial = build(original, passes, candidates)
        ok, trial_summary = budget.check(trial)
        if ok:
            optimized, summary = trial, trial_summary
            log(f"refined {c.record.node}: option {c.choice + 1} of {len(c.options)} fits")
        else:
            c.choice += 1
            tried.add(id(c))
    return optimized, summary


def _next_saving(c: Candidate) -> tuple[int, int]:
    """(bytes, FLOPs) the candidate's next more compressive option saves over its current choice: FLOPs break
    ties between options of one size (binary's activation widths, lowbit's int8 or float inputs)."""
    nxt = c.options[c.choice - 1]
    if c.active:
        return c.option.bytes_after - nxt.bytes_after, c.option.flops_after - nxt.flops_after
    return c.record.bytes_before - nxt.bytes_after, c.record.flops_before - nxt.flops_after


def _next_time_saving(c: Candidate) -> float:
    """Milliseconds the candidate's next more compressive option saves over its current choice."""
    current = c.option.ms_saved if c.active else 0.0
    return c.options[c.choice - 1].ms_saved - current
