"""Per-layer speed measurement for the speed-only passes (winograd, fftconv, depthwise): a rewrite is kept
only where onnxruntime runs it faster than the node it replaces.

Each candidate layer is cut out as a one-node model with its real weights and its input shape from the
model (batch `ctx.setting("batch")`, default 1). The original node and every rewrite run in onnxruntime at
the target thread count, A/B interleaved in one process, with a 64 MiB buffer touched before every run so
that no variant finds its weights warm from the previous one; the figure is the median over rounds. The
sessions' pool threads do not spin between runs (see onnxopt.library.session_options), so that the idle
sessions do not take the cores of the timed one. A
rewrite is kept only if its median beats the original's by at least MIN_GAIN.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.rewrite import Decline, Option, PassContext

# A rewrite must be at least this much faster than the original to be kept: below it, the difference is
# within the noise of a shared machine and the custom op would be a risk for no gain.
MIN_GAIN = 1.05
ROUNDS = 15
BUDGET_S = 3.0  # per layer: rounds stop early past this, after at least MIN_ROUNDS
MIN_ROUNDS = 5
FLUSH_BYTES = 64 << 20

_flush_buffer: np.ndarray | None = None


def flush_cache() -> None:
    """Touch a buffer larger than the last-level cache, evicting whatever the previous run left there."""
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = np.ones(FLUSH_BYTES // 8)
    _flush_buffer += 1.0


def layer_model(
    node: gs.Node, ctx: PassContext, option: Option | None = None, batch: int = 1
) -> onnx.ModelProto:
    """A model of `node` alone (or of `option`'s rewrite of it) with its constant inputs and its first input
    as the graph input, at batch size `batch`."""
    x = node.inputs[0]
    shape = list(ctx.shapes.get(x.name) or x.shape or [])
    if not shape or any(not isinstance(d, int) or d <= 0 for d in shape):
        raise Decline(f"input shape of {x.name} is unknown ({shape}): the layer cannot be timed")
    shape[0] = batch
    inp = gs.Variable(x.name, dtype=np.float32, shape=shape)
    out = gs.Variable(node.outputs[0].name, dtype=np.float32)
    inputs = [inp] + [t if isinstance(t, gs.Constant) else gs.Variable.empty() for t in node.inputs[1:]]
    copy = gs.Node(node.op, node.name, dict(node.attrs), inputs=inputs, outputs=[out], domain=node.domain)
    graph = gs.Graph(nodes=[copy], inputs=[inp], outputs=[out], opset=ctx.graph.opset)
    if option is not None:
        option.emit(graph, copy, f"{node.name}/timed")
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.opset_import.extend([onnx.helper.make_opsetid("onnxopt", 1)])
    return model


def median_times(
    models: list[onnx.ModelProto], threads: int, rounds: int = ROUNDS, stat: str = "median"
) -> list[float]:
    """Median ms of one run of each model (all take the same single input), interleaved, cache flushed;
    stat="min" as in session_times."""
    from onnxopt.library import session_for

    return session_times([session_for(m, threads, spin=False) for m in models], rounds, stat)


def session_times(sessions: list, rounds: int = ROUNDS, stat: str = "median") -> list[float]:
    """median_times over sessions already made (non-spinning: onnxopt.library.session_for(spin=False)), for
    sessions that differ only in how they were created (e.g. a setting read at kernel creation).
    stat="min": the fastest run of each, over all `rounds` (for a machine shared with other jobs, where a run
    that lost its core for a while says nothing about the kernel); "median" stops early past BUDGET_S."""
    if stat not in ("median", "min"):
        raise ValueError(f"stat must be median or min, got {stat!r}")
    inp = sessions[0].get_inputs()[0]
    x = np.random.default_rng(0).standard_normal(inp.shape).astype(np.float32)
    feed = {inp.name: x}
    for s in sessions:
        s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    for i in range(rounds):
        for s, t in zip(sessions, times, strict=True):
            flush_cache()
            t0 = time.perf_counter()
            s.run(None, feed)
            t.append((time.perf_counter() - t0) * 1e3)
        if stat == "median" and i + 1 >= MIN_ROUNDS and time.perf_counter() - start > BUDGET_S:
            break
    reduce = np.median if stat == "median" else np.min
    return [float(reduce(t)) for t in times]


def keep_faster(node: gs.Node, ctx: PassContext, options: list[Option]) -> list[Option]:
    """The options that run faster than `node` in onnxruntime at ctx.threads, fastest first, each with its
    measured times in its detail; raises Decline with the times when none is. With the pass setting
    `measure=0` nothing is timed and every option is kept (for tests and for users who know better)."""
    if not ctx.setting("measure", lambda v: v not in ("0", "false", "no"), True):
        for o in options:
            o.detail["measured"] = "no (measure=0)"
        return options
    batch = ctx.setting("batch", int, 1)
    models = [layer_model(node, ctx, None, batch)] + [layer_model(node, ctx, o, batch) for o in options]
    base, *times = median_times(models, ctx.threads)
    for o, t in zip(options, times, strict=True):
        o.detail.update(
            ms_before=round(base, 4), ms_after=round(t, 4), speedup=round(base / t, 3), threads=ctx.threads
        )
    faster = sorted((o for o, t in zip(options, times, strict=True) if base / t >= MIN_GAIN), key=_ms)
    if not faster:
        best = min(times)
        raise Decline(
            f"not faster: {base:.3f} ms in onnxruntime vs {best:.3f} ms rewritten "
            f"({base / best:.2f}x, needs {MIN_GAIN:g}x) at {ctx.threads} thread(s), batch {batch}"
        )
    return faster


def _ms(o: Option) -> float:
    return o.detail["ms_after"]
