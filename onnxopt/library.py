"""Where the custom-operator library lives, and onnxruntime sessions that have it registered.

The library is built by CMake through scikit-build-core and installed inside the `onnxopt` package. In an
editable install the package directory is the source tree while the library sits in site-packages, so the
lookup also asks the installed distribution's file list.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from importlib import metadata
from pathlib import Path

import onnxruntime as ort

from onnxopt.errors import OnnxoptError

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


def session_options(threads: int | None = None, optimized: bool = True) -> ort.SessionOptions:
    """SessionOptions with the library registered; `threads`: intra-op threads (None: ORT default)."""
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    return so


def make_session(
    model: str | os.PathLike | bytes,
    threads: int | None = None,
    optimized: bool = True,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> ort.InferenceSession:
    """An onnxruntime CPU session over `model` (path or bytes) with onnxopt's operators registered."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    return ort.InferenceSession(
        model, sess_options=session_options(threads, optimized), providers=list(providers)
    )
