"""Model inputs: .npz data files keyed by graph input name (samples on axis 0), seeded synthetic inputs
that fit the declared shapes and dtypes, and batching that respects fixed batch dimensions.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from onnxopt.analysis import input_shapes
from onnxopt.errors import UserError

Feeds = dict[str, np.ndarray]


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs of the graph (initializers listed as inputs are not)."""
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _np_dtype(vi: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))


def synthetic_inputs(
    model: onnx.ModelProto, samples: int = 8, dims: dict[str, int] | None = None, seed: int = 0
) -> Feeds:
    """Seeded random inputs: standard normal floats, small non-negative ints, random bools.

    Axis 0 holds `samples` samples when the batch dimension is symbolic; a fixed batch dimension is kept and
    the samples are stacked along it (see `batches`).
    """
    rng = np.random.default_rng(seed)
    shapes = input_shapes(model, dims)
    feeds = {}
    for vi in graph_inputs(model):
        shape = list(shapes[vi.name])
        if shape:
            shape[0] = shape[0] * samples if _fixed_batch(vi) else samples
        dt = _np_dtype(vi)
        if dt.kind == "f":
            feeds[vi.name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind in "iu":
            feeds[vi.name] = rng.integers(0, 10, size=shape).astype(dt)
        elif dt.kind == "b":
            feeds[vi.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise UserError(f"input {vi.name!r}: cannot synthesise data of dtype {dt}; pass a data file")
    return feeds


def _fixed_batch(vi: onnx.ValueInfoProto) -> int | None:
    dims = vi.type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
        return dims[0].dim_value
    return None


def _read_npz(path: str | os.PathLike) -> tuple[Path, dict[str, np.ndarray]]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such data file")
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{p}: not a readable .npz file ({e})") from e
    return p, data


def load_npz(path: str | os.PathLike, model: onnx.ModelProto) -> Feeds:
    """Load a data file and check it against the model's inputs: names, ranks, fixed dims; cast dtypes."""
    p, data = _read_npz(path)
    return checked_feeds(data, model, str(p))


def checked_feeds(data: dict[str, np.ndarray], model: onnx.ModelProto, p: str) -> Feeds:
    """`data` checked against the model's inputs (names, ranks, fixed dims, dtypes) and cast; `p` names the
    data in the errors."""
    inputs = graph_inputs(model)
    names = [vi.name for vi in inputs]
    missing = [n for n in names if n not in data]
    if missing:
        raise UserError(f"{p}: no array for graph input(s) {missing}; the file has {sorted(data)}")
    feeds = {}
    counts = set()
    for vi in inputs:
        arr = data[vi.name]
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and arr.ndim != len(dims):
            raise UserError(
                f"{p}: input {vi.name!r} has shape {arr.shape} but the model declares rank {len(dims)}"
            )
        for i, d in enumerate(dims):
            if i > 0 and d.HasField("dim_value") and d.dim_value > 0 and arr.shape[i] != d.dim_value:
                raise UserError(
                    f"{p}: input {vi.name!r} has shape {arr.shape}; the model needs {d.dim_value} on axis {i}"
                )
        fixed = _fixed_batch(vi)
        if fixed and arr.shape[0] % fixed:
            raise UserError(f"{p}: input {vi.name!r}: {arr.shape[0]} samples is no multiple of batch {fixed}")
        dt = _np_dtype(vi)
        if arr.dtype != dt and not np.can_cast(arr.dtype, dt, casting="same_kind"):
            raise UserError(f"{p}: input {vi.name!r} has dtype {arr.dtype}; the model needs {dt}")
        feeds[vi.name] = np.ascontiguousarray(arr.astype(dt, copy=False))
        counts.add(arr.shape[0] // (fixed or 1) if arr.ndim else 1)
    if len(counts) > 1:
        raise UserError(f"{p}: inputs hold different numbers of samples: {sorted(counts)}")
    return feeds


def load_samples(path: str | os.PathLike, model: onnx.ModelProto) -> list[Feeds]:
    """Samples of differing shapes (images of varying width, say) from an .npz keyed `<input>/<i>`: sample i
    is {input: array} for every graph input, each array with its own batch axis. Ranks, fixed dims and
    dtypes are checked against the model as in `load_npz`."""
    p, data = _read_npz(path)
    index: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in data.items():
        name, _, i = key.rpartition("/")
        if not name or not i.isdigit():
            raise UserError(f"{p}: key {key!r} is not <input>/<sample number>")
        index.setdefault(i, {})[name] = arr
    samples = [checked_feeds(index[i], model, f"{p}: sample {i}") for i in sorted(index, key=int)]
    if not samples:
        raise UserError(f"{p}: no samples")
    return samples


def batches(model: onnx.ModelProto, feeds: Feeds, max_batch: int = 64) -> Iterator[Feeds]:
    """Split feeds along axis 0 into runs the model accepts: its fixed batch size, else up to `max_batch`."""
    inputs = graph_inputs(model)
    if not inputs or not feeds:
        yield feeds
        return
    fixed = [_fixed_batch(vi) for vi in inputs]
    first = inputs[0].name
    total = feeds[first].shape[0] if feeds[first].ndim else 1
    step = fixed[0] or max_batch
    for start in range(0, total, step):
        yield {k: (v[start : start + step] if v.ndim else v) for k, v in feeds.items()}


def take(feeds: Feeds, n: int) -> Feeds:
    """The first n samples of every input."""
    return {k: (v[:n] if v.ndim else v) for k, v in feeds.items()}


def dims_from_feeds(model: onnx.ModelProto, feeds: Feeds) -> dict[str, int]:
    """Values of the symbolic dimensions as the data has them (axis 0, the sample axis, counts as 1)."""
    dims: dict[str, int] = {}
    for vi in graph_inputs(model):
        arr = feeds.get(vi.name)
        if arr is None:
            continue
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.dim_param and i < arr.ndim:
                dims.setdefault(d.dim_param, 1 if i == 0 else int(arr.shape[i]))
    return dims
