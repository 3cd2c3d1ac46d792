"""Where the custom-operator library lives, and onnxruntime sessions that have it registered.

The library is built by CMake through scikit-build-core and installed inside the `onnxopt` package. In an
editable install the package directory is the source tree while the library sits in site-packages, so the
lookup also asks the installed distribution's file list.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from functools import cache
from importlib import metadata
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxopt.errors import OnnxoptError
from onnxopt.graph import write_with_external_data

LIBRARY_NAME = "libonnxopt_ops.so"


@cache
def get_library_path() -> str:
    """Absolute path of the custom-op shared library, for `SessionOptions.register_custom_ops_library`."""
    override = os.environ.get("ONNXOPT_LIBRARY")
    candidates = [Path(override)] if override else []
    candidates.append(Path(__file__).resolve().parent / LIBRARY_NAME)
    try:
        dist = metadata.distribution("onnxopt")
        candidates += [
            Path(dist.locate_file(f)).resolve() for f in dist.files or () if f.name == LIBRARY_NAME
        ]
    except metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return str(path)
    looked = ", ".join(str(p) for p in candidates)
    raise OnnxoptError(
        f"onnxopt's operator library {LIBRARY_NAME} was not found (looked in: {looked}). "
        "Install the package with `pip install .` so that CMake builds it."
    )


def session_options(
    threads: int | None = None, optimized: bool = True, lean: bool = False, spin: bool = True
) -> ort.SessionOptions:
    """SessionOptions with the library registered; `threads`: intra-op threads (None: ORT default).

    `spin=False` stops the session's pool threads from spinning after a run: A/B timing holds several sessions
    in one process, and on a 2-core machine the idle sessions' spinning threads would take the cores from the
    one being timed."""
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    if lean:  # prepacked weight copies double a large model's memory; correctness checks need no such speed
        so.add_session_config_entry("session.disable_prepacking", "1")
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def make_session(
    model: str | os.PathLike | bytes,
    threads: int | None = None,
    optimized: bool = True,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    lean: bool = False,
    spin: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime CPU session over `model` (path or bytes) with onnxopt's operators registered.

    `lean` saves memory at some speed (no prepacked weights): for verification of large models, not timing."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    try:
        return ort.InferenceSession(
            model, sess_options=session_options(threads, optimized, lean, spin), providers=list(providers)
        )
    except Exception as e:  # onnxruntime's own error types (Fail, InvalidGraph, ...) share no useful base
        raise OnnxoptError(f"onnxruntime cannot load the model: {e}") from e


# Above this size a model is handed to onnxruntime through a temporary external-data file rather than as one
# serialized string: the string, onnxruntime's parse of it and its weights would be three copies at once.
LARGE_MODEL_BYTES = 64 * 2**20


def session_for(
    model: onnx.ModelProto,
    threads: int | None = None,
    optimized: bool = True,
    verify: bool = False,
    spin: bool = True,
) -> ort.InferenceSession:
    """A session (library registered) over an in-memory model, without tripling the memory of a large one.

    A large model is written as a weight-less proto plus an external-data file straight from its tensors, and
    onnxruntime loads that: no serialized copy of the whole model, and the proto itself is left untouched
    (clearing and reloading its tensors would not free memory: protobuf keeps it in the message's arena).
    `verify`: the session only checks numbers, so a large model's session skips prepacked weight copies.
    `spin`: see session_options.
    """
    if model.ByteSize() < LARGE_MODEL_BYTES:
        return make_session(model.SerializeToString(), threads, optimized, spin=spin)
    with tempfile.TemporaryDirectory(prefix="onnxopt-session-") as tmp:
        path = write_with_external_data(model, tmp)
        return make_session(path, threads, optimized, lean=verify, spin=spin)
