"""SparseGemm and SparseConv kernels (the `prune` method): the C++ ops in onnxruntime against the numpy
references over odd shapes, densities 0 .. 1 (with empty rows), batch sizes that take every kernel path
(gather for 1-4 rows, transposed tiles of 8, 16 and 32), strides, pads, dilations and column blocks, in the
AVX2 and portable builds at 1 and 2 threads; the references against onnxruntime's dense MatMul and Conv;
and every malformed CSR or attribute and wrong run-time shape giving a clear error, never a crash."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxopt
from onnxopt.reference import REFERENCE_OPS, SPECS
from onnxopt.reference.prune import check_csr, sparse_conv, sparse_gemm, to_csr
from tolerances import REL_L2, rel_l2

F32 = np.float32
TOL = REL_L2[np.dtype(F32)]
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("onnxopt", 1)]


def make_model(op: str, csr, bias=None, x_shape=None, constant=True, name="sp", **attrs) -> bytes:
    """One-node graph Y = op(X, values, indices, row_ptr[, bias]) with the CSR arrays as initializers (or,
    constant=False, values as a graph input)."""
    values, indices, row_ptr = csr
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    inits = [numpy_helper.from_array(indices, "indices"), numpy_helper.from_array(row_ptr, "row_ptr")]
    if constant:
        inits.append(numpy_helper.from_array(values, "values"))
    else:
        inputs.append(helper.make_tensor_value_info("values", TensorProto.FLOAT, list(values.shape)))
    names = ["X", "values", "indices", "row_ptr"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        names.append("bias")
    node = helper.make_node(op, names, ["Y"], domain="onnxopt", name=name, **attrs)
    out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "g", inputs, [out], inits)
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=10).SerializeToString()


def pruned(shape: tuple[int, ...], density: float, seed: int, empty_rows: int = 0) -> np.ndarray:
    """A random weight with about `density` of its entries kept; the first `empty_rows` rows all zero."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape).astype(F32) * (rng.random(shape) < density)
    W[:empty_rows] = 0
    return W


def run(model: bytes, X: np.ndarray, threads: int) -> np.ndarray:
    (Y,) = onnxopt.make_session(model, threads=threads).run(None, {"X": X})
    return Y


# (K, N, density, leading shape of X): batch 1 and 3 take the gather kernel, 6 a tile of 8, (2, 5) one of 16,
# 33 a tile of 32 plus one gathered row; K = 70000 takes 32-bit indices.
GEMM_CASES = [
    (13, 37, 0.3, (1,)),
    (37, 13, 0.05, (3,)),
    (100, 37, 1.0, (6,)),
    (37, 100, 0.3, (2, 5)),
    (100, 13, 0.0, (33,)),
    (13, 100, 0.05, (33,)),
    (100, 100, 0.3, (13,)),
    (70000, 5, 0.01, (1,)),
    (70000, 7, 0.003, (33,)),
    (1, 1, 1.0, (40,)),  # the smallest layer, tiles of 32 and 8
]


def gemm_id(case) -> str:
    K, N, d, lead = case
    return f"K={K},N={N},density={d},lead={list(lead)}"


@pytest.mark.parametrize("portable", [False, True], ids=["avx2", "portable"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", GEMM_CASES, ids=[gemm_id(c) for c in GEMM_CASES])
def test_sparse_gemm_matches_reference(case, bias, portable, monkeypatch):
    K, N, density, lead = case
    if portable:
        monkeypatch.setenv("ONNXOPT_DISABLE_AVX2", "1")  # read when the kernel is created
    W = pruned((N, K), density, seed=K + N, empty_rows=2)  # W^T: one row per output, two of them empty
    csr = to_csr(W)
    rng = np.random.default_rng(K)
    B = rng.standard_normal(N).astype(F32) if bias else None
    X = rng.standard_normal((*lead, K)).astype(F32)
    expected = sparse_gemm(X, *csr, B, K=K)
    model = make_model("SparseGemm", csr, B, x_shape=[f"d{i}" for i in range(len(lead))] + [K], K=K)
    what = f"{gemm_id(case)} bias={bias} portable={portable}"
    for threads in (1, 2):
        Y = run(model, X, threads)
        assert Y.shape == (*lead, N) and Y.dtype == F32, f"{what}: shape {Y.shape}"
        err = rel_l2(Y, expected)
        assert err <= TOL, f"{what} threads={threads}: rel L2 {err:.3e}"


# (C, M, kernel, strides, pads, dilations, H, W, batch, density)
CONV_CASES = [
    (13, 7, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 9, 7, 1, 0.3),  # 1x1 in place, a ragged last tile
    (300, 5, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 9, 7, 3, 0.3),  # 1x1 with column blocks
    (5, 9, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 3, 3, 2, 1.0),  # fewer positions than a tile
    (3, 5, (1, 1), (2, 2), (1, 0, 0, 1), (1, 1), 9, 7, 1, 0.3),  # 1x1 strided and padded: phase planes
    (13, 7, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 9, 7, 1, 0.3),
    (64, 11, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 16, 15, 1, 0.05),  # 3x3 with column blocks
    (7, 5, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 9, 7, 3, 0.3),
    (5, 3, (3, 2), (2, 1), (1, 0, 2, 1), (2, 1), 9, 7, 1, 0.3),
    (4, 6, (5, 5), (1, 2), (2, 2, 2, 2), (1, 1), 9, 7, 1, 0.05),
    (3, 4, (3, 3), (3, 3), (0, 0, 0, 0), (2, 2), 13, 11, 1, 1.0),
    (9, 5, (2, 3), (1, 1), (0, 1, 1, 0), (3, 1), 9, 7, 1, 0.0),
    (32, 40, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 33, 31, 1, 0.05),  # many tiles, tasks over positions
    (7, 5, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 6, 6, 2, 0.3),  # 32 + 4 positions: a ragged tile of 8
    (7, 5, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 4, 11, 1, 0.3),  # 32 + 12: a ragged tile of 16
    (6, 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 5, 5, 1, 0.5),  # 35 computed positions: ragged 8, slack
    (1, 1, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, 1, 2, 1.0),  # one pixel
    (3, 2, (1, 7), (1, 3), (0, 3, 0, 3), (1, 1), 1, 20, 2, 0.7),  # a 1-D row, stride 3
    (2, 3, (3, 3), (1, 1), (0, 0, 0, 0), (4, 4), 9, 9, 1, 0.7),  # dilation 4: one output pixel
]


def conv_id(case) -> str:
    C, M, k, s, p, d, H, W, n, dens = case
    return f"C={C},M={M},k={k[0]}x{k[1]},s={list(s)},p={list(p)},d={list(d)},{H}x{W},n={n},density={dens}"


@pytest.mark.parametrize("portable", [False, True], ids=["avx2", "portable"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[conv_id(c) for c in CONV_CASES])
def test_sparse_conv_matches_reference(case, portable, monkeypatch):
    C, M, k, s, p, d, H, W, n, density = case
    if portable:
        monkeypatch.setenv("ONNXOPT_DISABLE_AVX2", "1")
    Wt = pruned((M, C, *k), density, seed=C * 31 + M, empty_rows=1)
    csr = to_csr(Wt.reshape(M, -1))
    rng = np.random.default_rng(M)
    B = rng.standard_normal(M).astype(F32)
    X = rng.standard_normal((n, C, H, W)).astype(F32)
    attrs = dict(C=C, kernel_shape=list(k), strides=list(s), pads=list(p), dilations=list(d))
    expected = sparse_conv(X, *csr, B, **attrs)
    model = make_model("SparseConv", csr, B, x_shape=["N", C, H, W], **attrs)
    what = f"{conv_id(case)} portable={portable}"
    for threads in (1, 2):
        Y = run(model, X, threads)
        assert Y.shape == expected.shape and Y.dtype == F32, f"{what}: shape {Y.shape} vs {expected.shape}"
        err = rel_l2(Y, expected)
        assert err <= TOL, f"{what} threads={threads}: rel L2 {err:.3e}"


@pytest.mark.parametrize("kernel", [(1, 1), (3, 3)], ids=["1x1", "3x3"])
def test_sparse_conv_follows_the_input_size_from_call_to_call(kernel):
    """The kernel keeps its nonzero offsets for the last input size: one session with a symbolic spatial size,
    run at several sizes in turn, must match the reference at each."""
    Wt = pruned((6, 5, *kernel), 0.4, seed=11)
    csr = to_csr(Wt.reshape(6, -1))
    attrs = dict(C=5, kernel_shape=list(kernel), pads=[kernel[0] // 2] * 4)
    sess = onnxopt.make_session(make_model("SparseConv", csr, None, x_shape=["N", 5, "H", "W"], **attrs))
    rng = np.random.default_rng(11)
    for h, w in ((9, 7), (13, 11), (9, 7), (4, 3)):
        X = rng.standard_normal((2, 5, h, w)).astype(F32)
        (Y,) = sess.run(None, {"X": X})
        assert rel_l2(Y, sparse_conv(X, *csr, **attrs)) <= TOL, f"{kernel} at {h}x{w}"


def _dense_session(node: onnx.NodeProto, inits: list[onnx.TensorProto]):
    graph = helper.make_graph(
        [node],
        "dense",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=OPSETS[:1], ir_version=10)
    return onnxopt.make_session(model.SerializeToString())


def test_references_agree_with_onnxruntime_dense_ops():
    """The references' CSR reading against onnxruntime's own MatMul and Conv on the dense weights."""
    W = pruned((37, 13), 0.3, seed=5)  # W [K, N]
    X = np.random.default_rng(5).standard_normal((4, 37)).astype(F32)
    (Y,) = _dense_session(
        helper.make_node("MatMul", ["X", "W"], ["Y"]), [numpy_helper.from_array(W, "W")]
    ).run(None, {"X": X})
    assert rel_l2(sparse_gemm(X, *to_csr(W.T), K=37), Y) <= TOL
    Wc = pruned((5, 3, 3, 2), 0.4, seed=6)
    Xc = np.random.default_rng(6).standard_normal((2, 3, 9, 7)).astype(F32)
    conv = dict(strides=[2, 1], pads=[1, 0, 2, 1], dilations=[2, 1])
    node = helper.make_node("Conv", ["X", "W"], ["Y"], kernel_shape=[3, 2], **conv)
    (Yc,) = _dense_session(node, [numpy_helper.from_array(Wc, "W")]).run(None, {"X": Xc})
    got = sparse_conv(Xc, *to_csr(Wc.reshape(5, -1)), C=3, kernel_shape=(3, 2), **conv)
    assert rel_l2(got, Yc) <= TOL


def test_shapes_and_flops_of_the_analysis():
    """onnxopt.analysis reads both ops' output shapes (through their shape twins) and counts 2 nnz FLOPs per
    output row or pixel."""
    from onnxopt.analysis import node_stats, tensor_shapes

    gemm = to_csr(pruned((10, 13), 0.3, seed=9))
    conv = to_csr(pruned((6, 10, 3, 3), 0.3, seed=10).reshape(6, -1))
    names = ("v", "i", "p", "vc", "ic", "pc")
    inits = [numpy_helper.from_array(a, n) for a, n in zip((*gemm, *conv), names, strict=True)]
    nodes = [
        helper.make_node(
            "SparseConv",
            ["X", "vc", "ic", "pc"],
            ["h"],
            domain="onnxopt",
            name="c",
            C=10,
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("ReduceMean", ["h"], ["r"], axes=[2, 3], keepdims=0),
        helper.make_node("Pad", ["r", "pads"], ["q"]),
        helper.make_node("SparseGemm", ["q", "v", "i", "p"], ["Y"], domain="onnxopt", name="g", K=13),
    ]
    inits.append(numpy_helper.from_array(np.array([0, 0, 0, 7]), "pads"))
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 10, 9, 7])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=OPSETS, ir_version=10
    )
    shapes = tensor_shapes(model, {"N": 2})
    assert shapes["h"] == (2, 6, 5, 4) and shapes["Y"] == (2, 10), shapes
    flops = {s.name: s.flops for s in node_stats(model, {"N": 2})}
    assert flops["c"] == 2 * 2 * 5 * 4 * len(conv[0]) and flops["g"] == 2 * 2 * len(gemm[0]), flops


def test_reference_evaluator_and_specs():
    W = pruned((9, 13), 0.3, seed=7)
    csr = to_csr(W)
    X = np.random.default_rng(7).standard_normal((2, 13)).astype(F32)
    model = make_model("SparseGemm", csr, None, x_shape=[2, 13], K=13)
    (Y_ev,) = ReferenceEvaluator(onnx.load_from_string(model), new_ops=REFERENCE_OPS).run(None, {"X": X})
    assert rel_l2(run(model, X, 1), Y_ev) <= TOL
    Wc = pruned((4, 3, 3, 3), 0.3, seed=8)
    Xc = np.random.default_rng(8).standard_normal((1, 3, 9, 7)).astype(F32)
    attrs = dict(C=3, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    conv = make_model("SparseConv", to_csr(Wc.reshape(4, -1)), None, x_shape=[1, 3, 9, 7], **attrs)
    (Yc_ev,) = ReferenceEvaluator(onnx.load_from_string(conv), new_ops=REFERENCE_OPS).run(None, {"X": Xc})
    assert rel_l2(run(conv, Xc, 1), Yc_ev) <= TOL
    assert SPECS["SparseGemm"].reference is sparse_gemm and "row_ptr" in SPECS["SparseGemm"].describe()
    assert SPECS["SparseConv"].reference is sparse_conv and "kernel_shape" in SPECS["SparseConv"].describe()


# A valid 3 x 5 CSR (rows: 2 entries, none, 2 entries) that each case breaks in one way.
V = np.array([1.0, 2.0, 3.0, 4.0], F32)
I = np.array([0, 3, 1, 4], np.int32)
P = np.array([0, 2, 2, 4], np.int64)

MALFORMED = [
    pytest.param(
        dict(row_ptr=np.array([1, 2, 2, 4], np.int64)), r"row_ptr\[0\] must be 0, got 1", id="ptr-start"
    ),
    pytest.param(
        dict(row_ptr=np.array([0, 3, 2, 4], np.int64)),
        r"row_ptr must be non-decreasing: row_ptr\[2\] = 2 < row_ptr\[1\] = 3",
        id="ptr-not-monotone",
    ),
    pytest.param(
        dict(row_ptr=np.array([0, 2, 2, 3], np.int64)),
        r"row_ptr\[3\] \(the last entry\) must equal nnz = 4, got 3",
        id="ptr-wrong-end",
    ),
    pytest.param(
        dict(indices=np.array([0, 5, 1, 4], np.int32)),
        r"indices\[1\] = 5 in row 0 is out of range \[0, 5\)",
        id="index-too-large",
    ),
    pytest.param(
        dict(indices=np.array([0, 3, -1, 4], np.int32)),
        r"indices\[2\] = -1 in row 2 is out of range \[0, 5\)",
        id="index-negative",
    ),
    pytest.param(
        dict(indices=np.array([0, 3, 4, 4], np.int32)),
        r"indices\[3\] = 4 after indices\[2\] = 4 in row 2 \(duplicate\)",
        id="index-duplicate",
    ),
    pytest.param(
        dict(indices=np.array([3, 0, 1, 4], np.int32)),
        r"strictly increasing within a row: indices\[1\] = 0 after indices\[0\] = 3 in row 0 \(decreasing\)",
        id="index-decreasing",
    ),
    pytest.param(
        dict(indices=np.array([0, 3, 1], np.int32)),
        r"indices and values must have the same length nnz, got 3 and 4",
        id="lengths",
    ),
    pytest.param(
        dict(row_ptr=np.array([0], np.int64)), r"row_ptr must have at least 2 entries", id="ptr-short"
    ),
]


@pytest.mark.parametrize(("broken", "message"), MALFORMED)
@pytest.mark.parametrize("op", ["SparseGemm", "SparseConv"])
def test_malformed_csr_is_a_clear_error(op, broken, message):
    csr = (broken.get("values", V), broken.get("indices", I), broken.get("row_ptr", P))
    attrs = dict(K=5) if op == "SparseGemm" else dict(C=5, kernel_shape=[1, 1])
    shape = ["M", 5] if op == "SparseGemm" else [1, 5, 9, 7]
    with pytest.raises(Exception, match=message) as info:
        onnxopt.make_session(make_model(op, csr, x_shape=shape, **attrs))
    assert f"{op} node 'sp'" in str(info.value), str(info.value)
    with pytest.raises(ValueError, match=message):  # the reference checks the same, in the same words
        check_csr(*csr, cols=5)


CREATION_ERRORS = [
    pytest.param(
        "SparseGemm",
        dict(constant=False),
        r"values \(input 1, 'values'\) must be a constant",
        id="gemm-values-input",
    ),
    pytest.param(
        "SparseGemm",
        dict(bias=np.ones(4, F32)),
        r"bias must have shape \[N\] = \[3\], got \[4\]",
        id="gemm-bias",
    ),
    pytest.param(
        "SparseGemm", dict(attrs={}), r"attribute 'K' \(the input width\) is required", id="gemm-no-K"
    ),
    pytest.param("SparseGemm", dict(attrs=dict(K=0)), r"'K' must be in \[1, 2\^30\], got 0", id="gemm-K-0"),
    pytest.param(
        "SparseGemm",
        dict(attrs=dict(K=4)),
        r"indices\[3\] = 4 in row 2 is out of range \[0, 4\)",
        id="gemm-K-small",
    ),
    pytest.param(
        "SparseConv",
        dict(constant=False),
        r"values \(input 1, 'values'\) must be a constant",
        id="conv-values-input",
    ),
    pytest.param(
        "SparseConv", dict(attrs=dict(C=5, kernel_shape=[1, 1], group=5)), r"only group = 1", id="conv-group"
    ),
    pytest.param(
        "SparseConv", dict(attrs=dict(C=5)), r"'kernel_shape' must be 2 positive ints", id="conv-no-kernel"
    ),
    pytest.param(
        "SparseConv", dict(attrs=dict(kernel_shape=[1, 1])), r"attribute 'C' .* is required", id="conv-no-C"
    ),
    pytest.param(
        "SparseConv",
        dict(attrs=dict(C=1, kernel_shape=[2, 2])),
        r"indices\[3\] = 4 in row 2 is out of range \[0, 4\)",
        id="conv-column-out-of-range",
    ),
    pytest.param(
        "SparseConv",
        dict(attrs=dict(C=5, kernel_shape=[1, 1], strides=[0, 1])),
        r"'strides' must be 2 ints in \[1, 2\^24\]",
        id="conv-stride-0",
    ),
    pytest.param(
        "SparseConv",
        dict(attrs=dict(C=5, kernel_shape=[1, 1], pads=[1, 1])),
        r"'pads' must have 4 values",
        id="conv-pads",
    ),
    pytest.param(
        "SparseConv",
        dict(attrs=dict(C=5, kernel_shape=[1, 1], pads=[0, 0, 1 << 40, 0])),
        r"'pads' must be at most 2\^24",
        id="conv-pads-huge",
    ),
    pytest.param(
        "SparseConv",
        dict(attrs=dict(C=5, kernel_shape=[1, 1], auto_pad="SAME_UPPER")),
        r"auto_pad must be NOTSET",
        id="conv-auto-pad",
    ),
    pytest.param(
        "SparseConv",
        dict(bias=np.ones(2, F32)),
        r"bias must have shape \[M\] = \[3\], got \[2\]",
        id="conv-bias",
    ),
]


@pytest.mark.parametrize(("op", "change", "message"), CREATION_ERRORS)
def test_creation_errors_are_clear(op, change, message):
    change = dict(change)
    csr = (V, change.pop("indices", I), change.pop("row_ptr", P))
    default = dict(K=5) if op == "SparseGemm" else dict(C=5, kernel_shape=[1, 1])
    attrs = change.pop("attrs", default)
    shape = ["M", 5] if op == "SparseGemm" else [1, 5, 9, 7]
    with pytest.raises(Exception, match=message) as info:
        onnxopt.make_session(make_model(op, csr, change.pop("bias", None), x_shape=shape, **change, **attrs))
    assert f"{op} node 'sp'" in str(info.value), str(info.value)


@pytest.mark.parametrize("op", ["SparseGemm", "SparseConv"])
def test_wrong_index_dtypes_are_refused_by_the_schema(op):
    """The ops declare int32 indices and int64 row_ptr: onnxruntime itself refuses other types, naming the
    input, the op and the node, before any kernel is created."""
    attrs = dict(K=5) if op == "SparseGemm" else dict(C=5, kernel_shape=[1, 1])
    for csr, name in (((V, I.astype(np.int64), P), "indices"), ((V, I, P.astype(np.int32)), "row_ptr")):
        with pytest.raises(
            Exception, match=rf"input parameter \({name}\) of operator \({op}\) in node \(sp\)"
        ):
            onnxopt.make_session(make_model(op, csr, x_shape=None, **attrs))


def _unshaped(model: bytes) -> bytes:
    proto = onnx.load_from_string(model)
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    return proto.SerializeToString()


def test_gemm_run_time_errors_are_clear_and_the_session_survives():
    sess = onnxopt.make_session(_unshaped(make_model("SparseGemm", (V, I, P), x_shape=["M", 5], K=5)))
    rng = np.random.default_rng(1)
    with pytest.raises(Exception, match=r"X has last dimension 4 \(shape \[2, 4\]\) but the op has K = 5"):
        sess.run(None, {"X": rng.standard_normal((2, 4)).astype(F32)})
    with pytest.raises(Exception, match="X must have rank >= 1"):
        sess.run(None, {"X": np.array(1.0, F32)})
    X = rng.standard_normal((2, 5)).astype(F32)
    assert rel_l2(sess.run(None, {"X": X})[0], sparse_gemm(X, V, I, P, K=5)) <= TOL
    (Y0,) = sess.run(None, {"X": np.zeros((0, 5), F32)})
    assert Y0.shape == (0, 3)


def test_conv_run_time_errors_are_clear_and_the_session_survives():
    attrs = dict(C=5, kernel_shape=[1, 1])
    model = make_model("SparseConv", (V, I, P), x_shape=[1, 5, 9, 7], **attrs)
    sess = onnxopt.make_session(_unshaped(model))
    rng = np.random.default_rng(2)
    with pytest.raises(Exception, match=r"X has 4 channels \(shape \[1, 4, 9, 7\]\) but the op has C = 5"):
        sess.run(None, {"X": rng.standard_normal((1, 4, 9, 7)).astype(F32)})
    with pytest.raises(Exception, match=r"X must have rank 4 \[N, C, H, W\], got shape \[5, 9, 7\]"):
        sess.run(None, {"X": rng.standard_normal((5, 9, 7)).astype(F32)})
    X = rng.standard_normal((2, 5, 9, 7)).astype(F32)
    assert rel_l2(sess.run(None, {"X": X})[0], sparse_conv(X, V, I, P, **attrs)) <= TOL
    k3 = onnxopt.make_session(make_model("SparseConv", (V, I, P), x_shape=None, C=5, kernel_shape=[3, 3]))
    with pytest.raises(Exception, match=r"output would be empty: X \[1, 5, 2, 2\] with kernel 3x3"):
        k3.run(None, {"X": rng.standard_normal((1, 5, 2, 2)).astype(F32)})
