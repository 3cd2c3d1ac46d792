"""Model I/O: loading with clear errors, atomic saving (with external data for large models), node naming,
and the graph hygiene every pass ends with (cleanup, toposort, checker, shape inference).

A model over 2 GB cannot be one protobuf; it is saved with its tensors in a side file `<name>.data`.
Saving writes every file under a temporary name in the destination directory and renames it into place,
so a crash never leaves a half-written model and the input file is never touched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import google.protobuf.message
import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import UserError

PROTOBUF_LIMIT = 2**31 - 1
# Below this size a model is saved as one file; above, tensors go to external data (margin for the proto).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model with its external data; raise UserError with a clear reason when it cannot be."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file")
    if not p.is_file():
        raise UserError(f"{p}: not a file")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except google.protobuf.message.DecodeError as e:
        raise UserError(
            f"{p}: not a valid ONNX model (protobuf parse failed: {e}); truncated or not ONNX?"
        ) from e
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{p}: cannot load ONNX model: {e}") from e
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise UserError(f"{p}: not an ONNX model (no graph found)")
    if not model.opset_import:
        raise UserError(f"{p}: not an ONNX model (no opset_import)")
    return model


def check_model(model: onnx.ModelProto, what: str = "model") -> None:
    """onnx.checker on a model of any size (large ones are checked without the tensor bytes)."""
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(_without_tensor_data(model))
    except onnx.checker.ValidationError as e:
        raise UserError(f"{what} fails onnx.checker: {e}") from e


def _without_tensor_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the graph structure with initializers emptied, for checks that need no weights."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for t in light.graph.initializer:
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        t.external_data.add(key="location", value="stripped")
    return light


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference; models too large for one protobuf are inferred on a weight-less copy."""
    if model.ByteSize() < PROTOBUF_LIMIT:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    light = onnx.shape_inference.infer_shapes(_without_tensor_data(model), strict_mode=False)
    del model.graph.value_info[:]
    model.graph.value_info.extend(light.graph.value_info)
    return model


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name: rewrites, records and reports refer to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def tidy(graph: gs.Graph) -> onnx.ModelProto:
    """Cleanup + toposort a graphsurgeon graph and export it; the invariants every pass must keep."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return gs.export_onnx(graph, do_type_check=True)


def finish(model: onnx.ModelProto, template: onnx.ModelProto) -> onnx.ModelProto:
    """Carry model-level fields of the original over an exported graph, then check and infer shapes."""
    model.ir_version = template.ir_version
    model.producer_name = "onnxopt"
    model.doc_string = template.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    model.functions.extend(f for f in template.functions if f not in model.functions)
    check_model(model, "optimized model")
    return infer_shapes(model)


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> list[Path]:
    """Write `model` to `path` atomically; returns the files written (model, plus `.data` if external)."""
    dest = Path(path).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    data_name = dest.name + ".data"
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".onnxopt-") as tmp:
        tmp_model = Path(tmp) / dest.name
        if external:
            onnx.save_model(
                model,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            # The proto now points at the external file; the in-memory model stays whole for the caller.
            onnx.load_external_data_for_model(model, tmp)
        else:
            onnx.save_model(model, str(tmp_model))
        written = []
        if external:
            os.replace(Path(tmp) / data_name, dest.parent / data_name)
            written.append(dest.parent / data_name)
        os.replace(tmp_model, dest)
        written.insert(0, dest)
    return written


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size in bytes (what the file on disk takes, external data included)."""
    return model.ByteSize()
