"""Verification: run the original and the optimized model in onnxruntime on the same inputs and compare.

Per output: max-abs error, relative L2 error ||y' - y|| / ||y|| and cosine similarity <y, y'>/(|y||y'|),
over all samples. The per-layer report exposes every intermediate tensor the two graphs share by name
(rewrites keep the names of the outputs they replace) and names the first node, in the original's
topological order, whose output drifts past a threshold.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from onnxopt.analysis import tensor_shapes, unresolved
from onnxopt.data import Feeds, batches, take
from onnxopt.errors import OnnxoptError
from onnxopt.graph import skeleton
from onnxopt.library import session_for

TINY = 1e-30


@dataclass
class OutputError:
    """Differences of one output tensor between the original (y) and the optimized model (y')."""

    name: str
    max_abs: float
    rel_l2: float
    cosine: float

    def as_dict(self) -> dict:
        return asdict(self)


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray) -> OutputError:
    """Error measures of `got` against `ref` (both cast to float64)."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    g = np.asarray(got, dtype=np.float64).ravel()
    if r.shape != g.shape:
        return OutputError(name, float("inf"), float("inf"), 0.0)
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(r))):
        same = bool(np.array_equal(r, g, equal_nan=True))
        return OutputError(
            name, 0.0 if same else float("inf"), 0.0 if same else float("inf"), 1.0 if same else 0.0
        )
    diff = g - r
    nr, ng = np.linalg.norm(r), np.linalg.norm(g)
    rel = (
        float(np.linalg.norm(diff) / max(nr, TINY))
        if nr > 0
        else float(np.linalg.norm(diff) > 0) * float("inf")
    )
    cos = float(r @ g / (nr * ng)) if nr > 0 and ng > 0 else float(nr == ng)
    return OutputError(name, float(np.max(np.abs(diff))) if diff.size else 0.0, rel, cos)


def run_model(
    model: onnx.ModelProto | bytes, feeds: Feeds, threads: int | None = None, outputs: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Outputs of `model` on all samples of `feeds`, concatenated along axis 0 over the batches."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
    sess = session_for(proto, threads=threads, verify=True)
    names = outputs or [o.name for o in sess.get_outputs()]
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in batches(proto, feeds):
        try:
            values = sess.run(names, batch)
        except Exception as e:  # onnxruntime's own error types share no useful base
            raise OnnxoptError(f"onnxruntime failed to run the model: {e}") from e
        for n, v in zip(names, values, strict=True):
            chunks[n].append(np.asarray(v))
    return {n: (np.concatenate(v) if v[0].ndim else v[0]) for n, v in chunks.items()}


def compare_models(
    original: onnx.ModelProto,
    optimized: onnx.ModelProto,
    feeds: Feeds,
    reference: dict[str, np.ndarray] | None = None,
) -> list[OutputError]:
    """Per-output errors of `optimized` against `original` (or precomputed `reference` outputs)."""
    ref = reference if reference is not None else run_model(original, feeds)
    got = run_model(optimized, feeds)
    return [
        compare_arrays(n, ref[n], got[n]) if n in got else OutputError(n, float("inf"), float("inf"), 0.0)
        for n in ref
    ]


@contextmanager
def extra_outputs(model: onnx.ModelProto, names: list[str]) -> Iterator[onnx.ModelProto]:
    """`model` with the named intermediate tensors added as outputs (types from shape inference on a
    weight-less skeleton), restored on exit; no copy of the weights is made."""
    inferred = onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=False)
    types = {
        vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    n_before = len(model.graph.output)
    present = {o.name for o in model.graph.output}
    for n in names:
        if n not in present and n in types and types[n].type.HasField("tensor_type"):
            model.graph.output.append(types[n])
            present.add(n)
    try:
        yield model
    finally:
        del model.graph.output[n_before:]


def first_divergence(
    original: onnx.ModelProto, optimized: onnx.ModelProto, feeds: Feeds, threshold: float
) -> dict | None:
    """The first node of the original whose output differs from the optimized graph's by more than
    `threshold` relative L2, with its error; None if every shared tensor stays within it."""
    produced = {o: n for n in original.graph.node for o in n.output if o}
    opt_tensors = {o for n in optimized.graph.node for o in n.output}
    shared = [o for n in original.graph.node for o in n.output if o and o in opt_tensors]
    with extra_outputs(original, shared) as m:
        a = run_model(m, feeds)
    with extra_outputs(optimized, shared) as m:
        b = run_model(m, feeds)
    for name in shared:
        if name in a and name in b and np.issubdtype(a[name].dtype, np.floating):
            err = compare_arrays(name, a[name], b[name])
            if err.rel_l2 > threshold:
                node = produced[name]
                return {"node": node.name, "op_type": node.op_type, "tensor": name, **err.as_dict()}
    return None


def complete_shapes(model: onnx.ModelProto, feeds: Feeds, dims: dict[str, int] | None = None) -> dict:
    """tensor_shapes, with the tensors FLOP counting needs and shape inference could not resolve (dynamic
    reshapes) read off one onnxruntime run of the first sample."""
    shapes = tensor_shapes(model, dims)
    missing = unresolved(model, shapes)
    if missing and feeds:
        with extra_outputs(model, missing) as m:
            present = [o.name for o in m.graph.output]
            values = run_model(m, next(iter(batches(m, take(feeds, 1)))), outputs=present)
        shapes.update({n: tuple(v.shape) for n, v in values.items() if n in missing})
    return shapes
