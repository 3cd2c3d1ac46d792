"""int8: static (calibrated, QDQ, per-channel weights) or dynamic quantization through onnxruntime, with
per-layer accuracy control.

The layers are the Conv, Gemm and MatMul nodes (where onnxruntime's integer kernels pay off). The whole
model is quantized; if it is over the budget, each layer's sensitivity is measured as the output error of
the model with only that layer quantized,
    s_i = max over outputs of ||y_i - y|| / ||y||   (y: the fp32 model, y_i: only layer i in int8),
on a few calibration samples, and the k most sensitive layers are kept in fp32 for the smallest k whose
model passes the budget (the manager's own Budget object: output relative L2, or the --eval metric): k is
bisected over 0..n (the error falls as k grows, up to interactions), then the kept layers, least sensitive
first, are tried in int8 one by one and stay so where the model still passes. If even the model with every
layer in fp32 but one fails, every int8 rewrite is undone and the result says why.

Settings (`--set int8.KEY=VALUE`): mode=static|dynamic (default static when --calib data is given, else
dynamic: activation ranges calibrated on synthetic inputs would be meaningless), per_channel=1|0,
reduce_range=0|1, activation=uint8|int8, calibrate=auto|minmax|percentile (auto: both, and the one whose fully
quantized model has the lower output error on the probe samples), ops=Conv,Gemm,MatMul (the op types
onnxruntime quantizes; `all` for every type it can), probe=16 (samples for the sensitivities), control=1|0
(0: quantize every layer or nothing), samples=FILE.npz (calibration samples of differing shapes, keyed
`<input>/<i>`, see onnxopt.data.load_samples; default: the --calib samples, one at a time).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from onnxopt.analysis import node_stats
from onnxopt.data import Feeds, load_samples, take
from onnxopt.errors import UserError
from onnxopt.library import session_for
from onnxopt.model_pass import ModelContext, ModelPass, ModelResult
from onnxopt.passes.int8_quantize import (
    CALIBRATORS,
    LAYER_OPS,
    Quantizer,
    QuantSettings,
    check_samples,
    split_samples,
)
from onnxopt.rewrite import Record, provenance
from onnxopt.verify import compare_arrays, complete_shapes

PROBE_SAMPLES = 16
REFINE_STEPS = 6  # kept layers tried in int8 again, one at a time, after the bisection
_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def settings_from(ctx: ModelContext) -> QuantSettings:
    """QuantSettings from the user's `--set int8.*`; UserError on a value it does not know."""
    known = {
        "mode",
        "per_channel",
        "reduce_range",
        "activation",
        "calibrate",
        "ops",
        "probe",
        "control",
        "samples",
    }
    unknown = sorted(set(ctx.settings) - known)
    if unknown:
        raise UserError(f"int8: unknown setting(s) {unknown}; known: {sorted(known)}")

    def choice(key: str, allowed, default):
        value = ctx.setting(key, str, default)
        if value not in allowed:
            raise UserError(f"--set int8.{key}={value}: expected one of {sorted(allowed)}")
        return value

    choice("control", _FLAGS, "1")  # read by _control; checked here with the rest
    if not ctx.setting("probe", str, "1").isdigit() or int(ctx.setting("probe", str, "1")) < 1:
        raise UserError(f"--set int8.probe={ctx.settings['probe']}: expected a positive number of samples")
    ops = ctx.setting("ops", str, ",".join(LAYER_OPS))
    return QuantSettings(
        mode=choice("mode", ("static", "dynamic"), "static" if ctx.calibrated else "dynamic"),
        per_channel=_FLAGS[choice("per_channel", _FLAGS, "1")],
        reduce_range=_FLAGS[choice("reduce_range", _FLAGS, "0")],
        activation=choice("activation", ("uint8", "int8"), "uint8"),
        calibrate=choice("calibrate", (*CALIBRATORS, "auto"), "auto"),
        op_types=() if ops == "all" else tuple(o.strip() for o in ops.split(",") if o.strip()),
    )


def check_dtypes(model: onnx.ModelProto) -> None:
    """UserError if a floating graph input is not float32: onnxruntime's int8 quantizers calibrate and
    quantize float32 graphs."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        if dt.kind == "f" and dt != np.float32:
            raise UserError(
                f"int8: graph input {vi.name!r} is {dt}; the int8 method quantizes float32 models"
            )


def layers(model: onnx.ModelProto, op_types: tuple[str, ...]) -> tuple[list[onnx.NodeProto], list[Record]]:
    """The nodes the per-layer control decides about, and records of those it cannot take (with why)."""
    inits = {t.name: t for t in model.graph.initializer}
    wanted = op_types or LAYER_OPS
    found, declined = [], []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in wanted:
            continue
        bad = [
            (n, inits[n].data_type)
            for n in node.input[:2]
            if n in inits and inits[n].data_type != onnx.TensorProto.FLOAT
        ]
        if bad:
            dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(bad[0][1]))
            declined.append(
                Record("int8", node.name, node.op_type, "declined", f"weight dtype {dt} is not float32")
            )
        else:
            found.append(node)
    return found, declined


class Probe:
    """The fp32 model's outputs on a few samples, and the error of another model against them."""

    def __init__(self, model: onnx.ModelProto, samples: list[Feeds]):
        check_samples(model, samples)
        self.samples = samples
        try:
            self.reference = self._outputs(model)
        except Exception as e:  # onnxruntime's errors share no base: data that does not fit lands here
            raise UserError(f"int8: calibration failed on this data (does it fit the model?): {e}") from e

    def _outputs(self, model: onnx.ModelProto) -> dict[str, np.ndarray]:
        # Samples may differ in shape (so may their outputs): each output is compared flattened.
        sess = session_for(model, verify=True)
        names = [o.name for o in sess.get_outputs()]
        runs = [sess.run(names, s) for s in self.samples]
        return {n: np.concatenate([np.ravel(r[i]) for r in runs]) for i, n in enumerate(names)}

    def error(self, model: onnx.ModelProto) -> float:
        got = self._outputs(model)
        return max(compare_arrays(n, ref, got[n]).rel_l2 for n, ref in self.reference.items())


class Int8(ModelPass):
    name = "int8"
    lossy = True
    default = False  # quantization changes every layer's numerics; it is asked for, and wants --calib data
    summary = (
        "Conv/Gemm/MatMul -> int8 through onnxruntime.quantization: static (calibrated QDQ, per-channel "
        "weights) or dynamic; the layers whose quantization breaks the budget stay fp32, chosen by "
        "measured sensitivity"
    )

    def run(self, model: onnx.ModelProto, ctx: ModelContext) -> ModelResult:
        qs = settings_from(ctx)
        check_dtypes(model)
        found, declined = layers(model, qs.op_types)
        if not found:
            return ModelResult(
                model, declined, False, messages=["int8: no Conv/Gemm/MatMul layer to quantize"]
            )
        samples = ctx.samples or split_samples(ctx.feeds)
        if "samples" in ctx.settings:
            samples = load_samples(ctx.settings["samples"], model)
        probe = Probe(model, samples[: ctx.setting("probe", int, PROBE_SAMPLES)])
        q, note = _calibrated(model, samples, qs, probe, [r.node for r in declined])
        with q:
            result = _control(model, ctx, q, q.settings, found, declined, probe)
        result.messages += [note] if note else []
        flops = _flops(model, ctx.feeds)
        for r in result.records:  # int8 runs the same multiply-adds, in integers
            r.flops_before = r.flops_after = flops.get(r.node, 0)
        return result


def _calibrated(model, samples, qs: QuantSettings, probe: Probe, skip: list[str]) -> tuple[Quantizer, str]:
    """The Quantizer, calibrated. With calibrate=auto, both calibrators are tried and the one whose fully
    quantized model is closer to the fp32 one on the probe samples is kept: MinMax keeps every activation
    in range, the percentile clips rare outliers for a finer step (PP-OCR's recognizer: 0.17 against 0.22
    output rel L2), and which wins depends on the model."""
    if qs.mode != "static" or qs.calibrate != "auto":
        return Quantizer(model, samples, qs), ""
    tried = []
    for method in CALIBRATORS:
        q = Quantizer(model, samples, replace(qs, calibrate=method))
        tried.append((probe.error(q.quantize(exclude=skip)), method, q))
    tried.sort(key=lambda t: t[0])
    for _, _, other in tried[1:]:
        other.close()
    errors = ", ".join(f"{m} {e:.3g}" for e, m, _ in tried)
    return tried[0][2], f"int8: calibration {tried[0][1]} chosen (whole-model output rel L2 {errors})"


def _control(model, ctx, q, qs, found, declined, probe) -> ModelResult:
    """Quantize all layers; over budget, keep the most sensitive ones in fp32 (see the module doc)."""
    skip = [r.node for r in declined]
    names = [n.name for n in found]
    full = q.quantize(exclude=skip)
    ok, measured = ctx.budget.check(full)
    ctx.log(f"int8 ({qs.mode}): every layer quantized: {'within' if ok else 'over'} budget")
    if ok or not ctx.setting("control", _FLAGS.get, True):
        if ok:
            return _result(model, full, measured, found, set(), {}, declined, qs, "")
        why = f"undone: with every layer in int8 the model is over budget ({ctx.budget.summarise(measured)})"
        return _undone(model, found, declined, why)
    sens = {n: probe.error(q.quantize(only=[n])) for n in names}
    order = sorted(names, key=lambda n: -sens[n])
    ctx.log("int8 sensitivities: " + ", ".join(f"{n} {sens[n]:.3g}" for n in order))
    lo, hi, best = 0, len(order), None  # keeping order[:lo] fails, order[:hi] passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        trial = q.quantize(exclude=skip + order[:mid])
        ok, m = ctx.budget.check(trial)
        ctx.log(f"int8: {mid} most sensitive layers in fp32: {'within' if ok else 'over'} budget")
        if ok:
            hi, best = mid, (trial, m)
        else:
            lo = mid
    if best is None:
        why = f"undone: over budget ({ctx.budget.summarise(measured)}) with every layer in int8"
        if len(order) > 1:
            why += ", and still over with all but the least sensitive layer kept fp32"
        return _undone(model, found, declined, why, sens)
    kept = order[:hi]
    for name in list(reversed(kept))[:REFINE_STEPS]:  # least sensitive first
        rest = [n for n in kept if n != name]
        trial = q.quantize(exclude=skip + rest)
        ok, m = ctx.budget.check(trial)
        if ok:
            kept, best = rest, (trial, m)
    why = (
        f"kept fp32: among the {len(kept)} most sensitive of {len(names)} layers; with every layer in int8 "
        f"the model is over budget ({ctx.budget.summarise(measured)})"
    )
    return _result(model, best[0], best[1], found, set(kept), sens, declined, qs, why)


def _undone(model, found, declined, why, sens=None) -> ModelResult:
    sens = sens or {}
    records = [
        Record("int8", n.name, n.op_type, "undone", why, detail=_sens_detail(sens, n.name, "control=0"))
        for n in found
    ]
    return ModelResult(model, records + declined, False, failure=why)


def _sens_detail(sens: dict[str, float], name: str, unmeasured: str) -> dict:
    return {"sensitivity": float(sens[name]) if name in sens else f"not measured ({unmeasured})"}


def _result(model, quantized, measured, found, kept, sens, declined, qs, why) -> ModelResult:
    before = _layer_bytes(model, model)
    after = _layer_bytes(model, quantized)
    made = _new_nodes(model, quantized)
    records = []
    for n in found:
        b = before.get(n.name, (0, 0))
        rec = Record("int8", n.name, n.op_type, "applied", params_before=b[0], bytes_before=b[1])
        rec.detail = _sens_detail(sens, n.name, "every layer in int8 fits the budget")
        if n.name in kept:
            rec.status = "undone"
            rec.reason = f"{why}; sensitivity {sens[n.name]:.3g} (output rel L2 with only it in int8)"
            rec.params_after, rec.bytes_after = b
        else:
            rec.params_after, rec.bytes_after = after.get(n.name, b)
            rec.est_error = sens.get(n.name, 0.0)
            rec.detail.update(mode=qs.mode, per_channel=qs.per_channel, activation=qs.activation)
            if qs.mode == "static":
                rec.detail["calibrate"] = qs.calibrate
            rec.new_nodes = made.get(n.name, [])
        records.append(rec)
    records += declined
    provenance(quantized, records)
    return ModelResult(quantized, records, True, measured)


def _layer_bytes(model: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Per layer of `model`: parameters and bytes of its constant inputs in `quantized`, where the quantizer
    replaced a constant c by c_quantized (int8 weights, int32 bias) with c_scale and c_zero_point, or
    c_quantized_scale and c_quantized_zero_point (both quantizers name them so)."""
    inits = {t.name: t for t in quantized.graph.initializer}
    suffixes = ("_quantized", "_scale", "_zero_point", "_quantized_scale", "_quantized_zero_point")
    consts = {t.name for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        params = nbytes = 0
        for c in (i for i in node.input if i in consts):
            parts = [inits[c]] if c in inits else [inits[c + s] for s in suffixes if c + s in inits]
            params += int(np.prod(parts[0].dims)) if parts else 0
            nbytes += sum(_nbytes(t) for t in parts)
        out[node.name] = (params, nbytes)
    return out


def _flops(model: onnx.ModelProto, feeds: Feeds) -> dict[str, int]:
    """FLOPs per node at the shapes of the first calibration sample."""
    shapes = complete_shapes(model, take(feeds, 1))
    return {s.name: s.flops for s in node_stats(model, shapes=shapes)}


def _nbytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _new_nodes(model: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, list[str]]:
    """Per layer: the quantizer's nodes that stand for it (dynamic mode replaces a node by ones named after
    it) or sit next to it (the DequantizeLinear nodes feeding it, the QuantizeLinear nodes it feeds)."""
    old = {n.name for n in model.graph.node}
    producer = {o: n for n in quantized.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in quantized.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    new = [n for n in quantized.graph.node if n.name not in old]
    out: dict[str, set[str]] = {}
    for n in quantized.graph.node:
        if n.name in old:
            near = [producer[i] for i in n.input if i in producer]
            near += [c for o in n.output for c in consumers.get(o, [])]
            out[n.name] = {m.name for m in near if m.name not in old}
    for name in old:
        out.setdefault(name, set()).update(n.name for n in new if n.name.startswith(name + "_"))
    return {k: sorted(v) for k, v in out.items()}
