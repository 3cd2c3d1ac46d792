"""FFTConv kernel: the C++ op in onnxruntime against the numpy reference and onnxruntime's own Conv over odd
shapes, kernels, paddings, strides (polyphase) and batches, on the AVX2 and the portable path, at 1 and 2
threads; plus creation-time and run-time errors, and the onnx reference evaluator."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxopt
from onnxopt.reference import REFERENCE_OPS, SPECS
from onnxopt.reference.fftconv import fft_conv
from tolerances import REL_L2_FFT, rel_l2

F32 = np.float32


def make_model(
    op_type: str, W, B=None, pads=(0, 0, 0, 0), strides=(1, 1), *, w_as_input=False, x_shape=None, **attrs
) -> bytes:
    """One-node graph Y = op(X, W[, B]) with symbolic N, H, W (and C when x_shape says so)."""
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape or ["N", W.shape[1], "H", "W"])]
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
    if op_type == "Conv":
        attrs["kernel_shape"] = list(W.shape[2:])
    domain = "" if op_type == "Conv" else "onnxopt"
    node = helper.make_node(op_type, names, ["Y"], name=f"{op_type}_0", domain=domain, **attrs)
    out = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    graph = helper.make_graph([node], "g", inputs, out, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(onnxopt.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def stock_session(model: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


@functools.cache
def weights(M: int, C: int, KH: int, KW: int, bias: bool):
    rng = np.random.default_rng([M, C, KH, KW, int(bias)])
    W = rng.standard_normal((M, C, KH, KW), dtype=F32)
    return W, (rng.standard_normal(M, dtype=F32) if bias else None)


# (N, C, H, W, M, KH, KW, pads, strides, bias)
CASES = [
    (1, 1, 9, 7, 1, 5, 5, (0, 0, 0, 0), (1, 1), False),
    (3, 3, 9, 7, 5, 5, 5, (2, 2, 2, 2), (1, 1), True),
    (1, 13, 13, 15, 16, 7, 7, (3, 3, 3, 3), (1, 1), True),
    (3, 15, 13, 15, 5, 7, 7, (1, 0, 2, 3), (2, 2), False),
    (1, 3, 13, 15, 16, 9, 9, (0, 1, 2, 3), (1, 2), True),
    (1, 15, 301, 1, 5, 11, 1, (2, 0, 1, 0), (1, 1), True),
    (3, 1, 301, 1, 16, 64, 1, (31, 0, 32, 0), (4, 1), True),
    (1, 13, 301, 1, 5, 64, 1, (0, 0, 0, 0), (1, 1), False),
    (1, 3, 7, 301, 16, 1, 11, (0, 3, 0, 2), (1, 2), True),
    (1, 3, 90, 87, 5, 5, 5, (2, 2, 2, 2), (1, 1), True),  # more than one tile along both axes
    (1, 1, 1100, 1, 16, 512, 1, (254, 0, 254, 0), (4, 1), True),  # the crepe first layer, fewer filters
    # Outputs over 4 MiB whose tile rows have at most 4 tiles: inverse tasks of whole tile rows that stream
    # whole output rows. Several images, 21 filters (a last group of 5 lanes), planes of 151x167 (an odd size,
    # so each plane starts at another alignment); then four tiles to a tile row.
    (2, 3, 151, 167, 21, 7, 7, (3, 3, 3, 3), (1, 1), True),
    (2, 5, 130, 230, 20, 5, 5, (2, 2, 2, 2), (1, 1), True),
    (1, 3, 300, 301, 16, 7, 7, (3, 3, 3, 3), (1, 1), True),  # over 4 MiB, more than 4 tiles to a row
    (2, 3, 70, 75, 13, 7, 7, (3, 3, 3, 3), (1, 1), True),  # whole tile rows, but a small output
    # C' < 8: forward transforms packed with whole tiles (floor(8 / C') to a transform): C' = 2 (4 tiles to a
    # transform, a tile count that is not a multiple of 4 and a last transform with idle lanes), C' = 7 (the
    # products' generic channel loop), C' = 6 by the stride split of 3 channels.
    (3, 2, 90, 87, 11, 5, 5, (2, 2, 2, 2), (1, 1), True),
    (1, 7, 90, 87, 9, 5, 5, (2, 1, 2, 3), (1, 1), False),
    (1, 3, 61, 95, 10, 5, 5, (2, 2, 2, 2), (1, 2), True),
]


def describe(case) -> str:
    N, C, H, Wd, M, KH, KW, pads, strides, bias = case
    return (
        f"N={N} C={C} H={H} W={Wd} M={M} kernel={KH}x{KW} pads={list(pads)} strides={list(strides)} "
        f"bias={bias}"
    )


@pytest.mark.parametrize("portable", [False, True], ids=["avx2", "portable"])
@pytest.mark.parametrize("case", CASES, ids=[describe(c).replace(" ", ",") for c in CASES])
def test_kernel_matches_reference_and_onnxruntime_conv(case, portable, monkeypatch):
    N, C, H, Wd, M, KH, KW, pads, strides, bias = case
    W, B = weights(M, C, KH, KW, bias)
    X = np.random.default_rng(len(describe(case))).standard_normal((N, C, H, Wd), dtype=F32)
    if portable:
        monkeypatch.setenv("ONNXOPT_DISABLE_AVX2", "1")  # read when the kernel is created
    what = f"{describe(case)} portable={portable}"
    (Y_ort,) = stock_session(make_model("Conv", W, B, pads, strides)).run(None, {"X": X})
    Y_ref = fft_conv(X, W, B, pads, strides)
    assert rel_l2(Y_ref, Y_ort) <= REL_L2_FFT, f"{what}: numpy reference vs onnxruntime Conv"
    model = make_model("FFTConv", W, B, pads, strides)
    for threads in (1, 2):
        (Y,) = onnxopt.make_session(model, threads=threads).run(None, {"X": X})
        assert Y.shape == Y_ort.shape and Y.dtype == F32, f"{what}: shape {Y.shape} vs {Y_ort.shape}"
        err_ref, err_ort = rel_l2(Y, Y_ref), rel_l2(Y, Y_ort)
        assert err_ref <= REL_L2_FFT, f"{what} threads={threads}: vs reference rel L2 {err_ref:.3e}"
        assert err_ort <= REL_L2_FFT, f"{what} threads={threads}: vs onnxruntime rel L2 {err_ort:.3e}"


def test_reference_tiles_agree():
    """The reference's tiling and polyphase split give the same result whatever the tile size."""
    W, B = weights(5, 3, 7, 7, True)
    X = np.random.default_rng(1).standard_normal((2, 3, 40, 37), dtype=F32)
    base = fft_conv(X, W, B, (1, 2, 3, 0), (2, 1))
    for tile in [(4, 8), (8, 8), (16, 64), (64, 16)]:
        assert rel_l2(fft_conv(X, W, B, (1, 2, 3, 0), (2, 1), tile=tile), base) <= 1e-12, tile


def test_reference_evaluator_and_spec():
    W, B = weights(5, 3, 5, 5, True)
    model = make_model("FFTConv", W, B, (1, 1, 1, 1), (2, 1))
    X = np.random.default_rng(2).standard_normal((1, 3, 9, 7), dtype=F32)
    (Y_eval,) = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, {"X": X})
    (Y,) = onnxopt.make_session(model).run(None, {"X": X})
    assert rel_l2(Y, Y_eval) <= REL_L2_FFT
    spec = SPECS["FFTConv"]
    assert spec.reference is fft_conv
    for word in ("pads", "strides", "polyphase", "constant initializer"):
        assert word in spec.describe()


def test_default_attributes_and_absent_bias():
    W, _ = weights(5, 3, 5, 5, False)
    model = make_model("FFTConv", W, None, pads=None, strides=None)
    X = np.random.default_rng(3).standard_normal((1, 3, 9, 7), dtype=F32)
    (Y,) = onnxopt.make_session(model).run(None, {"X": X})
    assert Y.shape == (1, 5, 5, 3)
    assert rel_l2(Y, fft_conv(X, W)) <= REL_L2_FFT


def _unknown_rank(model: bytes) -> bytes:
    proto = onnx.load_from_string(model)
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    return proto.SerializeToString()


def test_run_time_errors_are_clear_and_the_session_survives():
    W, B = weights(5, 3, 5, 5, True)
    sess = onnxopt.make_session(_unknown_rank(make_model("FFTConv", W, B, (1, 1, 1, 1))))
    rng = np.random.default_rng(4)
    with pytest.raises(Exception, match=r"X has 4 channels .* W expects C = 3"):
        sess.run(None, {"X": rng.standard_normal((1, 4, 9, 7), dtype=F32)})
    with pytest.raises(Exception, match="rank 4"):
        sess.run(None, {"X": rng.standard_normal((3, 9, 7), dtype=F32)})
    with pytest.raises(Exception, match="output would be empty"):
        sess.run(None, {"X": rng.standard_normal((1, 3, 2, 9), dtype=F32)})
    X = rng.standard_normal((2, 3, 9, 7), dtype=F32)
    (Y,) = sess.run(None, {"X": X})
    assert rel_l2(Y, fft_conv(X, W, B, (1, 1, 1, 1))) <= REL_L2_FFT


CREATION_ERRORS = [
    pytest.param(dict(w_as_input=True), r"W \(input 1, 'W'\) must be a constant initializer", id="W-input"),
    pytest.param(dict(pads=(1, 1)), r"'pads' must have 4 values", id="pads-2"),
    pytest.param(dict(pads=(1, -1, 1, 1)), r"'pads' must be non-negative", id="pads-negative"),
    pytest.param(dict(strides=(0, 1)), r"'strides' must be 2 positive values", id="strides-0"),
    pytest.param(dict(strides=(2, 2, 2)), r"'strides' must be 2 positive values", id="strides-3"),
    pytest.param(dict(dilations=[2, 2]), r"only dilations = 1", id="dilations-2"),
    pytest.param(dict(group=3), r"only group = 1", id="group-3"),
    pytest.param(dict(kernel_shape=[3, 3]), r"kernel_shape \[3, 3\] does not match", id="kernel-shape"),
    pytest.param(dict(W=np.ones((5, 3, 5), F32)), r"W must have shape \[M, C, KH, KW\]", id="W-rank-3"),
    pytest.param(dict(B=np.ones(2, F32)), r"B must have shape \[M\] = \[5\]", id="B-length"),
]


@pytest.mark.parametrize(("kwargs", "message"), CREATION_ERRORS)
def test_creation_errors_are_clear(kwargs, message):
    kwargs = dict(kwargs)
    W0, B0 = weights(5, 3, 5, 5, True)
    W, B = kwargs.pop("W", W0), kwargs.pop("B", B0)
    x_shape = ["N", 3, "H", "W"]
    with pytest.raises(Exception, match=message) as info:
        onnxopt.make_session(make_model("FFTConv", W, B, x_shape=x_shape, **{"pads": (1, 1, 1, 1), **kwargs}))
    assert "FFTConv node 'FFTConv_0'" in str(info.value), f"{kwargs}: {info.value}"
    X = np.random.default_rng(5).standard_normal((1, 3, 9, 7), dtype=F32)  # a valid model still runs
    (Y,) = onnxopt.make_session(make_model("FFTConv", W0, B0, (1, 1, 1, 1))).run(None, {"X": X})
    assert rel_l2(Y, fft_conv(X, W0, B0, (1, 1, 1, 1))) <= REL_L2_FFT
