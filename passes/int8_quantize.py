"""onnxruntime.quantization behind one small interface for the int8 method: calibrate once, then quantize
the same model many times with different layers left in fp32.

Static mode (QDQ): activations x are quantized per tensor, q = clip(round(x / s) + z, qmin, qmax), with s
and z from the range [min, max] of x over the calibration samples (MinMax, or the percentile of its
histogram); weights per output channel, symmetric int8, s_c = max|W_c| / 127. onnxruntime fuses
DequantizeLinear -> Conv/MatMul/Gemm -> QuantizeLinear into its integer kernels. Dynamic mode: weights are
quantized the same way ahead of time, activations at run time from each input's own range (no calibration).

Nothing here re-implements quantization: the ranges come from onnxruntime's calibrators and the rewrite
from quantize_static / quantize_dynamic. What this module adds is what onnxopt needs around them:
- calibration samples are fed one at a time (the OCR recognizer's inputs differ in width, so they cannot be
  stacked), in one collect_data call per input shape (the histogram calibrators stack the outputs of one
  call), and the ranges are computed once and cached, so each of the many quantizations that the
  per-layer control tries skips calibration;
- the calibration session registers onnxopt's operator library (the model may hold onnxopt custom ops from
  earlier passes), and those ops are excluded from quantization;
- onnxruntime's errors on data that does not fit the model become a UserError.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.calibrate import MinMaxCalibrater, PercentileCalibrater, save_tensors_data

from onnxopt.data import Feeds, graph_inputs
from onnxopt.errors import UserError
from onnxopt.library import make_session

CUSTOM_DOMAIN = "onnxopt"
# The layers the per-layer control decides about: the nodes with weights, where int8 pays off.
LAYER_OPS = ("Conv", "Gemm", "MatMul")
MIN_OPSET = 13
CALIBRATORS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}


@dataclass
class QuantSettings:
    """How to quantize: mode, and onnxruntime's options for it (see Int8 for the user settings)."""

    mode: str = "static"  # or "dynamic"
    per_channel: bool = True
    reduce_range: bool = False
    activation: str = "uint8"  # or "int8"
    calibrate: str = "minmax"  # or "percentile"
    op_types: tuple[str, ...] = LAYER_OPS
    extra: dict = field(default_factory=dict)


class SampleReader(CalibrationDataReader):
    """Feeds the calibrator one sample (a dict of inputs) at a time; samples may differ in shape."""

    def __init__(self, samples: list[Feeds]):
        self.samples = samples
        self.next = 0

    def get_next(self) -> Feeds | None:
        if self.next >= len(self.samples):
            return None
        self.next += 1
        return self.samples[self.next - 1]

    def __len__(self) -> int:
        return len(self.samples)


def split_samples(feeds: Feeds) -> list[Feeds]:
    """One feed dict per sample (axis 0 kept, of size 1): the calibrator sees each sample alone."""
    if not feeds:
        return []
    n = min(v.shape[0] for v in feeds.values() if v.ndim)
    return [{k: (v[i : i + 1] if v.ndim else v) for k, v in feeds.items()} for i in range(n)]


def same_shape_groups(samples: list[Feeds]) -> list[list[Feeds]]:
    """The samples grouped by the shapes of their inputs, in order of first appearance."""
    groups: dict[tuple, list[Feeds]] = {}
    for s in samples:
        groups.setdefault(tuple((k, v.shape) for k, v in sorted(s.items())), []).append(s)
    return list(groups.values())


def check_samples(model: onnx.ModelProto, samples: list[Feeds]) -> None:
    """UserError unless every sample has a float32 (or the declared) array per graph input of its rank."""
    if not samples:
        raise UserError("int8: no calibration samples")
    inputs = graph_inputs(model)
    for i, s in enumerate(samples):
        for vi in inputs:
            if vi.name not in s:
                raise UserError(f"int8: calibration sample {i} has no array for graph input {vi.name!r}")
            want = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            rank = len(vi.type.tensor_type.shape.dim)
            arr = s[vi.name]
            if arr.dtype != want or (rank and arr.ndim != rank):
                raise UserError(
                    f"int8: calibration sample {i}, input {vi.name!r}: {arr.dtype} of shape {arr.shape}; "
                    f"the model needs {np.dtype(want)} of rank {rank}"
                )


def custom_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of onnxopt custom-op nodes (left alone by the quantizer)."""
    return [n.name for n in model.graph.node if n.domain == CUSTOM_DOMAIN]


def _typed_custom_outputs(model: onnx.ModelProto) -> None:
    """Declare the outputs of onnxopt ops as float32 tensors: onnx shape inference has no schema for them,
    and the calibrator ignores tensors of unknown type (the layers after them would lose their ranges)."""
    known = {vi.name for vi in [*model.graph.value_info, *model.graph.output]}
    for node in model.graph.node:
        if node.domain == CUSTOM_DOMAIN:
            for out in node.output:
                if out and out not in known:
                    model.graph.value_info.append(
                        onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)
                    )


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _at_least_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """A copy of `model` at opset `version` or later: per-channel DequantizeLinear (its `axis`) needs 13,
    and exporters such as paddle2onnx write 12."""
    if _opset(model) >= version:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    try:
        return onnx.version_converter.convert_version(model, version)
    except Exception as e:  # the converter raises bare RuntimeErrors and ValueErrors
        raise UserError(
            f"int8: the model's opset {_opset(model)} is too old for per-channel int8 and onnx cannot "
            f"convert it to opset {version}: {e}"
        ) from e


def _with_library(base: type) -> type:
    """A calibrator class whose session registers onnxopt's library (onnxruntime's plain one cannot load a
    model that holds onnxopt ops)."""

    def create_inference_session(self) -> None:
        self.infer_session = make_session(str(self.augmented_model_path), optimized=False)

    return type(f"Library{base.__name__}", (base,), {"create_inference_session": create_inference_session})


class Quantizer:
    """One model, calibrated once (static mode); `quantize(exclude)` gives it with those nodes in fp32."""

    def __init__(self, model: onnx.ModelProto, samples: list[Feeds], settings: QuantSettings):
        self.settings = settings
        self._tmp = tempfile.TemporaryDirectory(prefix="onnxopt-int8-")
        self.dir = Path(self._tmp.name)
        prepared = _at_least_opset(model, MIN_OPSET)
        _typed_custom_outputs(prepared)
        self.model_path = self.dir / "model.onnx"
        onnx.save_model(prepared, str(self.model_path))
        self.always_excluded = custom_nodes(model)
        self.cache = self.dir / "ranges.json"
        self._count = 0
        if settings.mode == "static":
            check_samples(model, samples)
            self._calibrate(samples)

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> Quantizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _calibrate(self, samples: list[Feeds]) -> None:
        s = self.settings
        base = MinMaxCalibrater if s.calibrate == "minmax" else PercentileCalibrater
        calibrator = _with_library(base)(
            self.model_path, list(s.op_types), augmented_model_path=str(self.dir / "augmented.onnx")
        )
        calibrator.augment_graph()
        calibrator.create_inference_session()
        # The histogram calibrators print their progress to stdout, which is the CLI's report.
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                # The histogram calibrators stack what one collect_data call sees: samples of one shape per
                # call (both kinds merge their statistics across calls).
                for group in same_shape_groups(samples):
                    calibrator.collect_data(SampleReader(group))
            except Exception as e:  # onnxruntime's errors share no base; data that does not fit lands here
                raise UserError(f"int8: calibration failed on this data (does it fit the model?): {e}") from e
            save_tensors_data(calibrator.compute_data(), self.cache)
        del calibrator

    def quantize(self, exclude: list[str] = (), only: list[str] | None = None) -> onnx.ModelProto:
        """The model quantized except the nodes in `exclude` (or only the nodes in `only`)."""
        s = self.settings
        self._count += 1
        out = self.dir / f"q{self._count}.onnx"
        common = dict(
            per_channel=s.per_channel,
            reduce_range=s.reduce_range,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(s.op_types),
            nodes_to_quantize=list(only or []),
            nodes_to_exclude=[*exclude, *self.always_excluded],
            extra_options=dict(s.extra),
        )
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # its advice to run pre-processing, on every call
        try:
            if s.mode == "static":
                quantize_static(
                    self.model_path,
                    out,
                    None,
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8 if s.activation == "uint8" else QuantType.QInt8,
                    calibrate_method=CALIBRATORS[s.calibrate],
                    calibration_cache_path=self.cache,
                    **common,
                )
            else:
                quantize_dynamic(self.model_path, out, **common)
        finally:
            logging.getLogger().setLevel(quiet)
        model = onnx.load(str(out))
        out.unlink()
        return model
