"""Latency of whole models in onnxruntime, A/B interleaved in one process.

Each round runs every model once, in turn, so drift of this shared machine hits all of them alike; the
figure is the median over rounds. Whole-model timing keeps weights out of a hot cache only as much as
the model's size allows: a model whose weights fit in L3 runs from cache, as it does in deployment.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt.data import Feeds, take
from onnxopt.library import make_session, session_for


def latency(
    models: list[onnx.ModelProto | str],
    feeds: Feeds,
    threads: int = 1,
    rounds: int = 30,
    warmup: int = 3,
    budget_s: float = 20.0,
) -> list[dict]:
    """Per model (a proto, or a path that onnxruntime loads itself): median, p10 and p90 latency in ms of one
    run on the first sample of `feeds` (or the model's fixed batch)."""
    sessions = [
        make_session(m, threads, spin=False) if isinstance(m, str) else session_for(m, threads, spin=False)
        for m in models
    ]
    feed = _one_run(sessions[0], feeds)
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    for i in range(rounds):
        for s, t in zip(sessions, times, strict=True):
            t0 = time.perf_counter()
            s.run(None, feed)
            t.append((time.perf_counter() - t0) * 1e3)
        if i >= 5 and time.perf_counter() - start > budget_s:
            break
    return [
        {
            "threads": threads,
            "median_ms": float(np.median(t)),
            "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)),
            "rounds": len(t),
        }
        for t in times
    ]


def _one_run(session: ort.InferenceSession, feeds: Feeds) -> Feeds:
    """The feed of one run: the first sample, or the model's fixed batch size of samples."""
    fixed = (
        session.get_inputs()[0].shape[0] if session.get_inputs() and session.get_inputs()[0].shape else None
    )
    return take(feeds, fixed if isinstance(fixed, int) and fixed > 0 else 1)
