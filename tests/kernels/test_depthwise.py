"""DepthwiseConv kernel: the C++ op in onnxruntime against the numpy reference and onnxruntime's own Conv
(group = C, then Relu/Clip) over odd shapes, paddings, strides, batches, channel counts and fused activations,
on the AVX2 and the portable path; plus threading, creation-time and run-time errors, and the onnx reference
evaluator."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxopt
from onnxopt.reference import REFERENCE_OPS, SPECS
from onnxopt.reference.depthwise import depthwise_conv, output_size
from tolerances import REL_L2_REORDER, rel_l2, tol

OPSET = 17
IR_VERSION = 10
F32 = np.float32
ACT_ATTRS = {
    "": {},
    "relu": {"activation": "relu"},
    "clip": {"activation": "clip", "clip_min": 0.0, "clip_max": 0.8},
}


# ----------------------------------------------------------------------------------------------- helpers


def make_model(
    W: np.ndarray,
    B: np.ndarray | None = None,
    pads=(0, 0, 0, 0),
    strides=(1, 1),
    activation: str = "",
    *,
    stock: bool = False,
    x_shape=None,
    w_as_input: bool = False,
    **attrs,
) -> bytes:
    """One DepthwiseConv node, or (stock) onnxruntime's Conv group=C followed by the activation as a node."""
    C = W.shape[0]
    x_shape = x_shape if x_shape is not None else ["N", C, "H", "W"]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    inits = []
    if w_as_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(W.shape)))
    else:
        inits.append(numpy_helper.from_array(W, "W"))
    names = ["X", "W"]
    if B is not None:
        names.append("B")
        inits.append(numpy_helper.from_array(B, "B"))
    if pads is not None:
        attrs["pads"] = list(pads)
    if strides is not None:
        attrs["strides"] = list(strides)
    if stock:
        nodes = [helper.make_node("Conv", names, ["C"], kernel_shape=[3, 3], group=C, **attrs)]
        if activation == "relu":
            nodes.append(helper.make_node("Relu", ["C"], ["Y"]))
        elif activation == "clip":
            a = ACT_ATTRS["clip"]
            inits += [numpy_helper.from_array(np.array(a[k], F32), k) for k in ("clip_min", "clip_max")]
            nodes.append(helper.make_node("Clip", ["C", "clip_min", "clip_max"], ["Y"]))
        else:
            nodes[0].output[0] = "Y"
    else:
        known = activation in ACT_ATTRS  # anything else goes to the kernel as is, to test its errors
        attrs = {**(ACT_ATTRS[activation] if known else {"activation": activation}), **attrs}
        nodes = [helper.make_node("DepthwiseConv", names, ["Y"], name="dw", domain=onnxopt.DOMAIN, **attrs)]
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(onnxopt.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION).SerializeToString()


@functools.cache
def weights(C: int, bias: bool, seed: int = 0):
    rng = np.random.default_rng([seed, C, int(bias)])
    W = rng.standard_normal((C, 1, 3, 3), dtype=F32)
    return W, (rng.standard_normal(C, dtype=F32) if bias else None)


def stock_session(model: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def custom_session(model: bytes, path: str, monkeypatch, threads: int = 1) -> ort.InferenceSession:
    """A DepthwiseConv session on the given path: the kernel reads ONNXOPT_DISABLE_AVX2 when it is created."""
    if path == "portable":
        monkeypatch.setenv("ONNXOPT_DISABLE_AVX2", "1")
    else:
        monkeypatch.delenv("ONNXOPT_DISABLE_AVX2", raising=False)
    return onnxopt.make_session(model, threads=threads)


# ---------------------------------------------------------------------------------------- parameter grid

# Widths up to 32 take the AVX2 small-plane path at stride 1 (a zero-padded copy of the plane; 7, 13, 14, 15,
# 17: partial last blocks of every length class); 33 and 47 the in-place path with windowed border loads.
SPATIAL = [(1, 1), (2, 3), (7, 7), (7, 9), (9, 7), (13, 13), (14, 14), (15, 15), (16, 17), (5, 33), (4, 47)]
CHANNELS = [1, 13, 15, 16, 17]
# (1, 9, 0, 3): a left pad wider than a register, so border blocks lie wholly in the padding.
PADS = [(0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 2, 0), (2, 0, 1, 1), (1, 9, 0, 3)]
ACTIVATIONS = ["", "relu", "clip"]


@pytest.mark.parametrize("path", ["avx2", "portable"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("pads", PADS, ids=lambda p: "p" + "".join(map(str, p)))
def test_kernel_matches_reference_and_onnxruntime_conv(path, stride, pads, monkeypatch):
    checked = 0
    for C, activation in itertools.product(CHANNELS, ACTIVATIONS):
        bias = activation != "" or C % 2 == 1  # with and without B
        W, B = weights(C, bias)
        ours = custom_session(make_model(W, B, pads, (stride, stride), activation), path, monkeypatch)
        stock = stock_session(make_model(W, B, pads, (stride, stride), activation, stock=True))
        for (H, Wd), N in itertools.product(SPATIAL, [1, 3]):
            oh, ow = output_size(H, pads[0], pads[2], stride), output_size(Wd, pads[1], pads[3], stride)
            if oh <= 0 or ow <= 0:
                continue  # an empty output is an error, tested below
            what = f"{path} N={N} C={C} {H}x{Wd} pads={list(pads)} s={stride} act={activation!r} bias={bias}"
            X = np.random.default_rng([N, C, H, Wd]).standard_normal((N, C, H, Wd), dtype=F32)
            (Y,) = ours.run(None, {"X": X})
            a = ACT_ATTRS[activation]
            Y_ref = depthwise_conv(
                X, W, B, pads, (stride, stride), activation, a.get("clip_min", 0), a.get("clip_max", 0)
            )
            (Y_ort,) = stock.run(None, {"X": X})
            assert Y.shape == (N, C, oh, ow) == Y_ref.shape == Y_ort.shape, f"{what}: shape {Y.shape}"
            assert Y.dtype == F32, what
            err_ref, err_ort = rel_l2(Y, Y_ref), rel_l2(Y, Y_ort)
            assert err_ref <= tol(F32), f"{what}: vs numpy reference: rel L2 {err_ref:.3e}"
            assert err_ort <= tol(F32), f"{what}: vs onnxruntime Conv: rel L2 {err_ort:.3e}"
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("path", ["avx2", "portable"])
@pytest.mark.parametrize(
    "N,C,H,Wd,stride",
    [
        (1, 1, 200, 190, 1),
        (1, 2, 150, 161, 2),
        (2, 40, 30, 30, 1),
        (3, 17, 41, 23, 2),
        (3, 200, 14, 14, 1),
        (1, 500, 7, 7, 1),
        (2, 90, 40, 45, 1),
    ],
    ids=["row-bands", "row-bands-s2", "plane-runs", "plane-runs-s2", "small-14", "small-7", "plane-runs-45"],
)
def test_threads_1_and_2_agree(path, N, C, H, Wd, stride, monkeypatch):
    W, B = weights(C, True, seed=1)
    model = make_model(W, B, (1, 1, 1, 1), (stride, stride), "clip")
    X = np.random.default_rng(11).standard_normal((N, C, H, Wd), dtype=F32)
    (Y1,) = custom_session(model, path, monkeypatch, threads=1).run(None, {"X": X})
    (Y2,) = custom_session(model, path, monkeypatch, threads=2).run(None, {"X": X})
    what = f"{path} N={N} C={C} {H}x{Wd} stride={stride}"
    assert rel_l2(Y2, Y1) <= tol(F32, REL_L2_REORDER), f"{what}: 2 threads vs 1 thread"
    Y_ref = depthwise_conv(X, W, B, (1, 1, 1, 1), (stride, stride), "clip", 0.0, 0.8)
    assert rel_l2(Y1, Y_ref) <= tol(F32), f"{what}: vs numpy reference"


def test_paths_agree_and_nan_passes_through_clip(monkeypatch):
    W, B = weights(16, True)
    model = make_model(W, B, (1, 1, 1, 1), (1, 1), "clip")
    X = np.random.default_rng(2).standard_normal((1, 16, 12, 12), dtype=F32)
    X[0, 3, 5, 5] = np.nan
    (Ya,) = custom_session(model, "avx2", monkeypatch).run(None, {"X": X})
    (Yp,) = custom_session(model, "portable", monkeypatch).run(None, {"X": X})
    assert np.isnan(Ya[0, 3, 4:7, 4:7]).all() and np.isnan(Yp[0, 3, 4:7, 4:7]).all()
    mask = ~np.isnan(Ya)
    assert np.array_equal(mask, ~np.isnan(Yp)) and rel_l2(Ya[mask], Yp[mask]) <= tol(F32)


def test_defaults_when_attributes_absent_and_reference_evaluator(monkeypatch):
    W, B = weights(15, True)
    model = make_model(W, B, pads=None, strides=None)
    X = np.random.default_rng(4).standard_normal((2, 15, 5, 12), dtype=F32)
    (Y,) = custom_session(model, "avx2", monkeypatch).run(None, {"X": X})
    assert Y.shape == (2, 15, 3, 10)
    assert rel_l2(Y, depthwise_conv(X, W, B)) <= tol(F32)
    model = make_model(W, B, (0, 1, 2, 0), (2, 2), "clip", group=15)
    (Y_eval,) = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, {"X": X})
    (Y,) = custom_session(model, "avx2", monkeypatch).run(None, {"X": X})
    assert Y_eval.dtype == F32 and rel_l2(Y, Y_eval) <= tol(F32)


def test_spec_is_registered():
    spec = SPECS["DepthwiseConv"]
    assert spec.reference is depthwise_conv
    text = spec.describe()
    for word in ("pads", "strides", "activation", "clip_min", "group", "constant initializer"):
        assert word in text


def test_reference_rejects_bad_arguments():
    W, B = weights(13, True)
    X = np.zeros((1, 13, 5, 5), F32)
    for kwargs, message in [
        (dict(X=np.zeros((1, 12, 5, 5), F32)), "channels"),
        (dict(pads=(1, 1)), "pads"),
        (dict(strides=(3, 3)), "strides"),
        (dict(activation="gelu"), "activation"),
        (dict(X=np.zeros((1, 13, 2, 2), F32)), "empty"),
        (dict(B=B[:3]), "B must"),
    ]:
        args = {"X": X, "W": W, "B": B, **kwargs}
        with pytest.raises(ValueError, match=message):
            depthwise_conv(**args)


# ---------------------------------------------------------------------------------------------- errors


def _valid_model_still_runs(monkeypatch):
    W, B = weights(13, True)
    sess = custom_session(make_model(W, B, (1, 1, 1, 1)), "avx2", monkeypatch)
    X = np.random.default_rng(8).standard_normal((1, 13, 5, 5), dtype=F32)
    (Y,) = sess.run(None, {"X": X})
    assert rel_l2(Y, depthwise_conv(X, W, B, (1, 1, 1, 1))) <= tol(F32)


def test_run_time_errors_are_clear_and_the_session_survives(monkeypatch):
    W, B = weights(13, True)
    # Channel dimension symbolic, so onnxruntime lets a wrong channel count through to the kernel.
    sess = custom_session(make_model(W, B, (1, 1, 1, 1), x_shape=["N", "C", "H", "W"]), "avx2", monkeypatch)
    rng = np.random.default_rng(6)
    with pytest.raises(Exception, match=r"DepthwiseConv node 'dw': X has 14 channels .* W has C = 13"):
        sess.run(None, {"X": rng.standard_normal((1, 14, 9, 7), dtype=F32)})
    X = rng.standard_normal((2, 13, 9, 7), dtype=F32)
    (Y,) = sess.run(None, {"X": X})  # the process and the session live on
    assert rel_l2(Y, depthwise_conv(X, W, B, (1, 1, 1, 1))) <= tol(F32)

    proto = onnx.load_from_string(make_model(W, B))
    proto.graph.input[0].type.tensor_type.ClearField("shape")  # unknown rank: a rank-3 X reaches the kernel
    sess = custom_session(proto.SerializeToString(), "avx2", monkeypatch)
    with pytest.raises(Exception, match="rank 4"):
        sess.run(None, {"X": rng.standard_normal((13, 9, 7), dtype=F32)})
    with pytest.raises(Exception, match="output would be empty"):
        sess.run(None, {"X": rng.standard_normal((1, 13, 2, 5), dtype=F32)})
    X = rng.standard_normal((1, 13, 6, 6), dtype=F32)
    (Y,) = sess.run(None, {"X": X})
    assert rel_l2(Y, depthwise_conv(X, W, B)) <= tol(F32)
    _valid_model_still_runs(monkeypatch)


W13, B13 = weights(13, True)
CREATION_ERRORS = [
    pytest.param(
        dict(w_as_input=True), r"W \(input 1, 'W'\) must be a constant initializer", id="W-not-constant"
    ),
    pytest.param(
        dict(W=np.ones((13, 2, 3, 3), F32)), r"W must have shape \[C, 1, 3, 3\]", id="W-2-per-group"
    ),
    pytest.param(dict(W=np.ones((13, 1, 5, 5), F32)), r"W must have shape \[C, 1, 3, 3\]", id="W-5x5"),
    pytest.param(dict(B=np.ones(5, F32)), r"B must have shape \[C\] = \[13\]", id="B-length-5"),
    pytest.param(dict(pads=(1, 1)), r"'pads' must have 4 values", id="pads-length-2"),
    pytest.param(dict(pads=(1, -1, 1, 1)), r"'pads' must be non-negative", id="pads-negative"),
    pytest.param(dict(strides=(3, 3)), r"'strides' must be \[1, 1\] or \[2, 2\]", id="strides-3"),
    pytest.param(dict(strides=(1, 2)), r"'strides' must be \[1, 1\] or \[2, 2\]", id="strides-1-2"),
    pytest.param(dict(dilations=[2, 2]), r"only dilations = 1", id="dilations-2"),
    pytest.param(dict(group=1), r"group must equal the channel count C = 13", id="group-1"),
    pytest.param(dict(kernel_shape=[5, 5]), r"kernel_shape must be \[3, 3\]", id="kernel-5x5"),
    pytest.param(dict(activation="gelu"), r"'activation' must be .* got \"gelu\"", id="activation-gelu"),
    pytest.param(dict(activation=3), r"'activation' must be a string", id="activation-int"),
    pytest.param(
        dict(clip_max=6.0), r"clip_min / clip_max need activation = \"clip\"", id="clip-without-clip"
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), CREATION_ERRORS)
def test_creation_errors_are_clear(kwargs, message, monkeypatch):
    kwargs = dict(kwargs)
    W, B = kwargs.pop("W", W13), kwargs.pop("B", B13)
    pads, strides = kwargs.pop("pads", (1, 1, 1, 1)), kwargs.pop("strides", (1, 1))
    model = make_model(W, B, pads, strides, **kwargs)
    with pytest.raises(Exception, match=message) as info:
        custom_session(model, "avx2", monkeypatch)
    assert "DepthwiseConv node 'dw'" in str(info.value), f"{kwargs}: {info.value}"
    _valid_model_still_runs(monkeypatch)
