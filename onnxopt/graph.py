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
    """onnx.checker on the model's structure (a weight-less skeleton: no copy of the weights, any size)."""
    try:
        onnx.checker.check_model(skeleton(model))
    except onnx.checker.ValidationError as e:
        raise UserError(f"{what} fails onnx.checker: {e}") from e


SKELETON_KEEP_BYTES = 4096  # small initializers (shapes, axes) keep their data: shape inference reads them


def _copy_fields(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model whose large initializers are replaced by graph inputs of the same type and shape,
    for checks and shape inference that must not double the memory of a large model."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    declared = {vi.name for vi in model.graph.input}
    for t in model.graph.initializer:
        if t.ByteSize() <= SKELETON_KEEP_BYTES:
            light.graph.initializer.append(t)
            continue
        if t.name not in declared:  # the weight becomes a typed graph input: same type and shape, no data
            light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def write_with_external_data(
    model: onnx.ModelProto,
    directory: str | os.PathLike,
    name: str = "model.onnx",
    threshold: int = SKELETON_KEEP_BYTES,
) -> str:
    """Write `model` into `directory` as a proto without its large tensors plus `<name>.data` holding them,
    tensor by tensor, without modifying `model` or serializing it whole. Returns the proto's path."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    data_name = name + ".data"
    with open(os.path.join(directory, data_name), "wb") as f:
        for t in model.graph.initializer:
            if t.ByteSize() <= threshold or t.data_location == onnx.TensorProto.EXTERNAL:
                light.graph.initializer.append(t)
                continue
            raw = t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
            offset = -(-f.tell() // 4096) * 4096  # page-aligned, so onnxruntime may map it
            f.seek(offset)
            f.write(raw)
            lt = light.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
            lt.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                lt.external_data.add(key=k, value=v)
    path = os.path.join(directory, name)
    onnx.save_model(light, path)
    return path


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference into `model`'s value_info, run on a weight-less skeleton (no copy of the weights)."""
    light = onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=False)
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


def hoist_constants(model: onnx.ModelProto) -> int:
    """Turn Constant nodes holding a tensor into initializers (in place); returns how many. Exporters such
    as paddle2onnx put weights in Constant nodes, and passes look for weights among the initializers."""
    keep, hoisted = [], 0
    taken = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if (
            node.op_type == "Constant"
            and node.domain in ("", "ai.onnx")
            and value is not None
            and len(node.attribute) == 1
            and node.output[0] not in taken
        ):
            t = onnx.TensorProto()
            t.CopyFrom(value.t)
            t.name = node.output[0]
            model.graph.initializer.append(t)
            hoisted += 1
        else:
            keep.append(node)
    if hoisted:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return hoisted


def is_normalized(model: onnx.ModelProto) -> bool:
    """Nodes uniquely named and no Constant node holding a tensor (see `normalize`)."""
    return graph_names_ok(model) and not any(n.op_type == "Constant" for n in model.graph.node)


def normalize(model: onnx.ModelProto) -> None:
    """In place: Constant tensors become initializers and every node gets a unique name."""
    hoist_constants(model)
    name_nodes(model)


def graph_names_ok(model: onnx.ModelProto) -> bool:
    """True if every node has a name and no two share one."""
    names = [n.name for n in model.graph.node]
    return all(names) and len(set(names)) == len(names)


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
        written = []
        if external:  # tensor by tensor, leaving the caller's proto untouched
            write_with_external_data(model, tmp, dest.name, threshold=1024)
            os.replace(Path(tmp) / data_name, dest.parent / data_name)
            written.append(dest.parent / data_name)
        else:
            onnx.save_model(model, str(Path(tmp) / dest.name))
        os.replace(Path(tmp) / dest.name, dest)
        written.insert(0, dest)
    return written
