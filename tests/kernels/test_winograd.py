"""WinogradConv kernel: the C++ op in onnxruntime against the numpy reference, onnxruntime's own Conv and a
direct numpy convolution, over odd shapes, paddings, batches and channel counts; plus threading, run-time and
creation-time errors, the onnx reference evaluator, and the shape of the shared library."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxopt
from onnxopt.reference import REFERENCE_OPS, SPECS
from onnxopt.reference.winograd import AT, BT, G, WinogradConv, transform_weights, winograd_conv
from tolerances import REL_L2_REORDER, WINOGRAD_F4, rel_l2, tol

OPSET = 17
IR_VERSION = 10
F32 = np.float32


# ----------------------------------------------------------------------------------------------- helpers


def direct_conv(X, W, B=None, pads=(0, 0, 0, 0)):
    """Plain 3x3 stride-1 cross-correlation in float64 (what ONNX Conv computes), independent of Winograd."""
    top, left, bottom, right = pads
    Xp = np.pad(X.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    win = np.lib.stride_tricks.sliding_window_view(Xp, (3, 3), axis=(2, 3))  # [N, C, OH, OW, 3, 3]
    Y = np.einsum("ncyxij,mcij->nmyx", win, W.astype(np.float64))
    if B is not None:
        Y = Y + B.astype(np.float64)[None, :, None, None]
    return Y


def make_model(
    op_type: str,
    W: np.ndarray,
    B: np.ndarray | None = None,
    pads=(0, 0, 0, 0),
    *,
    x_shape=None,
    w_as_input: bool = False,
    empty_b: bool = False,
    **attrs,
) -> bytes:
    """One-node graph Y = op(X, W[, B]); W and B are initializers unless w_as_input.

    x_shape defaults to [N, C, H, W] with symbolic N, H, W so that one session runs every spatial size.
    """
    C = W.shape[1]
    if x_shape is None:
        x_shape = ["N", C, "H", "W"]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    initializers = []
    if w_as_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(W.shape)))
    else:
        initializers.append(numpy_helper.from_array(W, "W"))
    node_inputs = ["X", "W"]
    if B is not None:
        node_inputs.append("B")
        initializers.append(numpy_helper.from_array(B, "B"))
    elif empty_b:
        node_inputs.append("")  # an absent optional input
    if pads is not None:
        attrs["pads"] = list(pads)
    domain = "onnxopt" if op_type == "WinogradConv" else ""
    if op_type == "Conv":
        attrs.setdefault("kernel_shape", [3, 3])
    node = helper.make_node(op_type, node_inputs, ["Y"], name=f"{op_type}_0", domain=domain, **attrs)
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializers
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(onnxopt.DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)
    return model.SerializeToString()


def winograd_session(model: bytes, threads: int = 1) -> ort.InferenceSession:
    return onnxopt.make_session(model, threads=threads)


def stock_session(model: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


@functools.cache
def weights(C: int, M: int, bias: bool, seed: int = 0):
    rng = np.random.default_rng([seed, C, M, int(bias)])
    W = rng.standard_normal((M, C, 3, 3), dtype=F32)
    B = rng.standard_normal(M, dtype=F32) if bias else None
    return W, B


@contextlib.contextmanager
def portable_path(on: bool):
    """Kernels created inside take the portable build instead of the AVX2 one (read at kernel creation)."""
    old = os.environ.get("ONNXOPT_DISABLE_AVX2")
    if on:
        os.environ["ONNXOPT_DISABLE_AVX2"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ONNXOPT_DISABLE_AVX2", None)
        else:
            os.environ["ONNXOPT_DISABLE_AVX2"] = old


@functools.cache
def sessions(C: int, M: int, pads: tuple[int, ...], bias: bool, tile: int = 2, portable: bool = False):
    """(WinogradConv session, onnxruntime Conv session) over the same weights; cached across parameters."""
    W, B = weights(C, M, bias)
    with portable_path(portable):
        wino = winograd_session(make_model("WinogradConv", W, B, pads, tile=tile))
    return wino, stock_session(make_model("Conv", W, B, pads))


def out_size(H, Wd, pads):
    return H + pads[0] + pads[2] - 2, Wd + pads[1] + pads[3] - 2


# ---------------------------------------------------------------------------------------- parameter grid

SPATIAL = [(9, 7), (1, 1), (5, 12), (17, 17)]
PADS = [(0, 0, 0, 0), (1, 1, 1, 1), (2, 2, 2, 2), (0, 1, 2, 0), (2, 0, 1, 1)]
CHANNELS = [13, 15]
OUT_CHANNELS = [1, 16]
BATCH = [1, 3]
BIAS = [False, True]


def _cases():
    cases = []
    for (H, Wd), pads, C, M, N, bias in itertools.product(SPATIAL, PADS, CHANNELS, OUT_CHANNELS, BATCH, BIAS):
        oh, ow = out_size(H, Wd, pads)
        if oh <= 0 or ow <= 0:
            continue  # an empty output is an error, tested below
        seed = len(cases)
        case_id = f"N{N}-C{C}-{H}x{Wd}-M{M}-p{''.join(map(str, pads))}-{'bias' if bias else 'nobias'}"
        cases.append(pytest.param(N, C, H, Wd, M, pads, bias, seed, id=case_id))
    # M = 6 exercises the kernel's GEMM row tail (rows in blocks of 4); 40x6 gives several blocks of tiles;
    # M = 40 and 37 on few tiles split the work over output channels too, the last chunk partial.
    for N, C, H, Wd, M, pads, bias in [
        (1, 13, 9, 7, 6, (1, 1, 1, 1), True),
        (2, 15, 40, 6, 6, (0, 1, 2, 0), False),
        (1, 13, 5, 5, 40, (1, 1, 1, 1), True),
        (3, 15, 7, 9, 37, (0, 1, 2, 0), False),
        (2, 13, 30, 33, 16, (1, 1, 1, 1), True),  # whole groups of 8 inner tiles (the transposing paths)
        (1, 15, 26, 26, 7, (0, 0, 0, 0), False),
        (1, 130, 5, 6, 13, (1, 1, 1, 1), True),  # channels in two slices, the last of 2
        (2, 257, 4, 3, 7, (1, 0, 1, 2), False),  # three slices
    ]:
        seed = len(cases)
        case_id = f"N{N}-C{C}-{H}x{Wd}-M{M}-p{''.join(map(str, pads))}-{'bias' if bias else 'nobias'}"
        cases.append(pytest.param(N, C, H, Wd, M, pads, bias, seed, id=case_id))
    return cases


CASES = _cases()


def describe(N, C, H, Wd, M, pads, bias, seed):
    return f"N={N} C={C} H={H} W={Wd} M={M} pads={list(pads)} bias={bias} seed={seed}"


# ------------------------------------------------------------------------------------------------- tests


# (tile, portable build): F(2x2) and F(4x4), each through the AVX2 build (where the CPU has it) and the
# portable one.
VARIANTS = [
    pytest.param(2, False, id="F2"),
    pytest.param(4, False, id="F4"),
    pytest.param(2, True, id="F2-portable"),
    pytest.param(4, True, id="F4-portable"),
]


@pytest.mark.parametrize(("tile", "portable"), VARIANTS)
@pytest.mark.parametrize(("N", "C", "H", "Wd", "M", "pads", "bias", "seed"), CASES)
def test_kernel_matches_reference_and_onnxruntime_conv(N, C, H, Wd, M, pads, bias, seed, tile, portable):
    wino, conv = sessions(C, M, pads, bias, tile, portable)
    W, B = weights(C, M, bias)
    X = np.random.default_rng(seed).standard_normal((N, C, H, Wd), dtype=F32)
    what = describe(N, C, H, Wd, M, pads, bias, seed) + f" tile={tile} portable={portable}"

    (Y,) = wino.run(None, {"X": X})
    Y_ref = winograd_conv(X, W, B, pads, tile=tile)
    (Y_ort,) = conv.run(None, {"X": X})
    oh, ow = out_size(H, Wd, pads)
    assert Y.shape == (N, M, oh, ow) == Y_ref.shape, f"{what}: shape {Y.shape}, expected {(N, M, oh, ow)}"
    assert Y.dtype == F32, f"{what}: dtype {Y.dtype}"

    limit = tol(F32, WINOGRAD_F4) if tile == 4 else tol(F32)
    err_ref = rel_l2(Y, Y_ref)
    assert err_ref <= limit, f"{what}: kernel vs numpy reference: rel L2 {err_ref:.3e} > {limit:.1e}"
    err_ort = rel_l2(Y, Y_ort)
    assert err_ort <= limit, f"{what}: kernel vs onnxruntime Conv: rel L2 {err_ort:.3e} > {limit:.1e}"


@pytest.mark.parametrize(("N", "C", "H", "Wd", "M", "pads", "bias", "seed"), CASES[::3])
def test_reference_matches_direct_convolution(N, C, H, Wd, M, pads, bias, seed):
    W, B = weights(C, M, bias)
    X = np.random.default_rng(seed).standard_normal((N, C, H, Wd), dtype=F32)
    what = describe(N, C, H, Wd, M, pads, bias, seed)
    Y_ref = winograd_conv(X, W, B, pads)
    Y_dir = direct_conv(X, W, B, pads)
    assert Y_ref.shape == Y_dir.shape, f"{what}: shape {Y_ref.shape} vs {Y_dir.shape}"
    err = rel_l2(Y_ref, Y_dir)
    assert err <= tol(F32), f"{what}: numpy Winograd reference vs direct conv: rel L2 {err:.3e}"


def test_reference_rejects_bad_arguments():
    W, B = weights(13, 16, True)
    X = np.zeros((1, 13, 5, 5), F32)
    with pytest.raises(ValueError, match="channels"):
        winograd_conv(np.zeros((1, 12, 5, 5), F32), W, B)
    with pytest.raises(ValueError, match="pads"):
        winograd_conv(X, W, B, (1, 1))
    with pytest.raises(ValueError, match="empty"):
        winograd_conv(np.zeros((1, 13, 2, 2), F32), W, B)
    with pytest.raises(ValueError, match="B must"):
        winograd_conv(X, W, B[:3])


def test_single_tile_identity():
    """F(2x2, 3x3) on one 4x4 tile: A^T [(G g G^T) * (B^T d B)] A is the 2x2 valid correlation of d with g."""
    rng = np.random.default_rng(7)
    d = rng.standard_normal((4, 4))
    g = rng.standard_normal((3, 3))
    U = transform_weights(g[None, None], np.float64)[:, :, 0, 0]
    assert np.allclose(U, G @ g @ G.T)
    Y = AT @ (U * (BT @ d @ BT.T)) @ AT.T
    expected = np.array([[np.sum(d[i : i + 3, j : j + 3] * g) for j in range(2)] for i in range(2)])
    assert np.allclose(Y, expected, rtol=1e-12, atol=1e-12)
    assert transform_weights(np.ones((5, 2, 3, 3), F32)).shape == (4, 4, 5, 2)
    assert transform_weights(np.ones((5, 2, 3, 3), F32)).dtype == F32


def test_threads_1_and_2_agree():
    N, C, H, Wd, M, pads = 2, 32, 28, 28, 32, (1, 1, 1, 1)
    W, B = weights(C, M, True, seed=1)
    model = make_model("WinogradConv", W, B, pads)
    X = np.random.default_rng(11).standard_normal((N, C, H, Wd), dtype=F32)
    (Y1,) = winograd_session(model, threads=1).run(None, {"X": X})
    (Y2,) = winograd_session(model, threads=2).run(None, {"X": X})
    what = f"N={N} C={C} H={H} W={Wd} M={M} pads={list(pads)} seed=11"
    err = rel_l2(Y2, Y1)
    assert err <= tol(F32, REL_L2_REORDER), f"{what}: 2 threads vs 1 thread: rel L2 {err:.3e}"
    err_ref = rel_l2(Y1, direct_conv(X, W, B, pads))
    assert err_ref <= tol(F32), f"{what}: vs direct conv: rel L2 {err_ref:.3e}"


def test_absent_optional_bias_named_empty():
    W, _ = weights(13, 16, False)
    sess = winograd_session(make_model("WinogradConv", W, None, (1, 1, 1, 1), empty_b=True))
    X = np.random.default_rng(3).standard_normal((1, 13, 9, 7), dtype=F32)
    (Y,) = sess.run(None, {"X": X})
    assert rel_l2(Y, direct_conv(X, W, None, (1, 1, 1, 1))) <= tol(F32)


def test_default_pads_when_attribute_absent():
    W, B = weights(15, 1, True)
    model = make_model("WinogradConv", W, B, pads=None)
    X = np.random.default_rng(4).standard_normal((1, 15, 5, 12), dtype=F32)
    (Y,) = winograd_session(model).run(None, {"X": X})
    assert Y.shape == (1, 1, 3, 10)
    assert rel_l2(Y, direct_conv(X, W, B)) <= tol(F32)
    (Y_eval,) = ReferenceEvaluator(model, new_ops=[WinogradConv]).run(None, {"X": X})
    assert rel_l2(Y_eval, Y) <= tol(F32)


def test_reference_evaluator_runs_the_graph():
    W, B = weights(13, 16, True)
    pads = (0, 1, 2, 0)
    model = make_model("WinogradConv", W, B, pads)
    X = np.random.default_rng(5).standard_normal((3, 13, 9, 7), dtype=F32)
    (Y_eval,) = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, {"X": X})
    (Y,) = winograd_session(model).run(None, {"X": X})
    assert Y_eval.dtype == F32
    assert rel_l2(Y, Y_eval) <= tol(F32)


def test_spec_is_registered():
    spec = SPECS["WinogradConv"]
    assert spec.reference is winograd_conv
    text = spec.describe()
    for word in ("pads", "B^T", "A^T", "constant initializer"):
        assert word in text


# ---------------------------------------------------------------------------------------------- errors


def test_run_time_errors_are_clear_and_the_session_survives():
    W, B = weights(13, 16, True)
    pads = (1, 1, 1, 1)
    # Channel dimension symbolic, so onnxruntime lets a wrong channel count through to the kernel.
    sess = winograd_session(make_model("WinogradConv", W, B, pads, x_shape=["N", "C", "H", "W"]))
    rng = np.random.default_rng(6)
    with pytest.raises(Exception, match=r"X has 14 channels .* W expects C = 13"):
        sess.run(None, {"X": rng.standard_normal((1, 14, 9, 7), dtype=F32)})
    X = rng.standard_normal((2, 13, 9, 7), dtype=F32)
    (Y,) = sess.run(None, {"X": X})  # the process and the session live on
    assert rel_l2(Y, direct_conv(X, W, B, pads)) <= tol(F32)

    # Unknown rank: a rank-3 input reaches the kernel.
    sess = winograd_session(_unknown_rank_model(W, B))
    with pytest.raises(Exception, match="rank 4"):
        sess.run(None, {"X": rng.standard_normal((13, 9, 7), dtype=F32)})
    with pytest.raises(Exception, match="output would be empty"):
        sess.run(None, {"X": rng.standard_normal((1, 13, 2, 5), dtype=F32)})
    X = rng.standard_normal((1, 13, 6, 6), dtype=F32)
    (Y,) = sess.run(None, {"X": X})
    assert rel_l2(Y, direct_conv(X, W, B)) <= tol(F32)


def _unknown_rank_model(W, B):
    proto = onnx.load_from_string(make_model("WinogradConv", W, B, (0, 0, 0, 0)))
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    return proto.SerializeToString()


W13, B13 = weights(13, 16, True)
CREATION_ERRORS = [
    pytest.param(
        dict(w_as_input=True), r"W \(input 1, 'W'\) must be a constant initializer", id="W-not-constant"
    ),
    pytest.param(dict(pads=(1, 1)), r"'pads' must have 4 values", id="pads-length-2"),
    pytest.param(dict(pads=(1, 1, 1, 1, 1, 1)), r"'pads' must have 4 values", id="pads-length-6"),
    pytest.param(dict(pads=(1, -1, 1, 1)), r"'pads' must be non-negative", id="pads-negative"),
    pytest.param(dict(pads=(1.0, 1.0, 1.0, 1.0)), r"'pads' must be a list of ints", id="pads-floats"),
    pytest.param(dict(strides=[2, 2]), r"only strides = 1", id="strides-2"),
    pytest.param(dict(dilations=[2, 2]), r"only dilations = 1", id="dilations-2"),
    pytest.param(dict(group=13), r"only group = 1", id="group-13"),
    pytest.param(dict(kernel_shape=[5, 5]), r"kernel_shape must be \[3, 3\]", id="kernel-5x5"),
    pytest.param(dict(tile=3), r"'tile' must be 2 or 4", id="tile-3"),
    pytest.param(dict(tile=[4]), r"'tile' must be an int", id="tile-list"),
    pytest.param(dict(W=np.ones((16, 13, 3, 2), F32)), r"W must have shape \[M, C, 3, 3\]", id="W-3x2"),
    pytest.param(dict(B=np.ones(5, F32)), r"B must have shape \[M\] = \[16\]", id="B-length-5"),
]


@pytest.mark.parametrize(("kwargs", "message"), CREATION_ERRORS)
def test_creation_errors_are_clear(kwargs, message):
    kwargs = dict(kwargs)
    W = kwargs.pop("W", W13)
    B = kwargs.pop("B", B13)
    pads = kwargs.pop("pads", (1, 1, 1, 1))
    model = make_model("WinogradConv", W, B, pads, **kwargs)
    with pytest.raises(Exception, match=message) as info:
        winograd_session(model)
    assert "WinogradConv node 'WinogradConv_0'" in str(info.value), f"{kwargs}: {info.value}"
    # The process is fine: a valid model still runs.
    sess = winograd_session(make_model("WinogradConv", W13, B13, (1, 1, 1, 1)))
    X = np.random.default_rng(8).standard_normal((1, 13, 5, 5), dtype=F32)
    (Y,) = sess.run(None, {"X": X})
    assert rel_l2(Y, direct_conv(X, W13, B13, (1, 1, 1, 1))) <= tol(F32)


# --------------------------------------------------------------------------------------------- library


def test_library_exports_only_the_entry_point_and_links_no_onnxruntime():
    path = onnxopt.get_library_path()
    assert os.path.isfile(path), path

    nm = shutil.which("nm")
    if nm:
        out = subprocess.run([nm, "-D", "--defined-only", path], capture_output=True, text=True, check=True)
        symbols = [line.split() for line in out.stdout.splitlines() if line.strip()]
        functions = [s[-1] for s in symbols if len(s) >= 3 and s[1] in "TtWi"]
        assert functions == ["RegisterCustomOps"], f"exported functions of {path}: {functions}"
        others = [s[-1] for s in symbols if len(s) >= 3 and s[1] not in "TtWiA"]
        assert others == [], f"other exported symbols of {path}: {others}"

    readelf = shutil.which("readelf")
    ldd = shutil.which("ldd")
    if readelf:
        out = subprocess.run([readelf, "-d", path], capture_output=True, text=True, check=True).stdout
        needed = re.findall(r"\(NEEDED\).*\[(.+?)\]", out)
        assert needed, f"readelf found no NEEDED entries in {path}:\n{out}"
    elif ldd:
        out = subprocess.run([ldd, path], capture_output=True, text=True, check=False).stdout
        needed = [line.split()[0] for line in out.splitlines() if line.strip()]
    else:
        pytest.skip("neither readelf nor ldd available")
    assert not [n for n in needed if "onnxruntime" in n], f"{path} depends on onnxruntime: {needed}"
