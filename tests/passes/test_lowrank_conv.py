"""lowrank on Conv: the patches, the three factorizations (channel, spatial, Tucker-2), and the pass on small
graphs whose filters have the structure each scheme captures."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.budget import OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.manager import optimize
from onnxopt.passes.lowrank import LowRank
from onnxopt.passes.lowrank_conv import (
    geometry,
    output_error,
    patches,
    spatial_factors,
    spatial_svd,
    spatial_weight,
    tucker_bases,
    tucker_factors,
    tucker_weight,
)
from onnxopt.verify import compare_models
from tolerances import rel_l2, tol

F32 = np.float32


def conv_model(W, B, size=(11, 13), **attrs) -> onnx.ModelProto:
    """x [N, C, H, W] -> Conv(W, B, attrs) -> Relu -> y."""
    M, C, kh, kw = W.shape
    C *= attrs.get("group", 1)
    node = helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", kernel_shape=[kh, kw], **attrs)
    relu = helper.make_node("Relu", ["c"], ["y"], name="relu")
    graph = helper.make_graph(
        [node, relu],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, *size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", M, "OH", "OW"])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def structured(kind: str, M=24, C=16, k=3, rank=3, noise=1e-3, seed=0) -> np.ndarray:
    """Filters that one scheme represents exactly at `rank` (plus a little noise)."""
    rng = np.random.default_rng(seed)
    if kind == "channel":
        W = rng.standard_normal((M, rank)) @ rng.standard_normal((rank, C * k * k))
    elif kind == "spatial":
        W = np.einsum("mrj,rci->mcij", rng.standard_normal((M, rank, k)), rng.standard_normal((rank, C, k)))
    else:  # tucker with ranks (rank, rank)
        core = rng.standard_normal((rank, rank, k, k))
        W = np.einsum(
            "mo,onij,cn->mcij", rng.standard_normal((M, rank)), core, rng.standard_normal((C, rank))
        )
    W = W.reshape(M, C, k, k)
    W = W / np.linalg.norm(W) * np.sqrt(M)
    return (W + noise * rng.standard_normal(W.shape) * np.abs(W).mean()).astype(F32)


def _run(model, max_error=1e-2, **settings):
    feeds = synthetic_inputs(model, samples=6, seed=3)
    settings = {"conv": "1", **settings}
    budget = OutputBudget(model, feeds, max_error)
    return optimize(model, [LowRank()], feeds, budget, max_error, settings={"lowrank": settings}), feeds


# ---------------------------------------------------------------------------------------------- numpy


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 1, 1, 1]},
        {"pads": [0, 1, 2, 1], "strides": [2, 1]},
        {"pads": [2, 2, 2, 2], "dilations": [2, 2], "strides": [1, 2]},
        {},
    ],
)
def test_patches_times_filters_is_the_convolution(attrs):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((5, 3, 3, 3), dtype=F32)
    B = rng.standard_normal(5, dtype=F32)
    X = rng.standard_normal((2, 3, 9, 10), dtype=F32)
    model = conv_model(W, B, size=(9, 10), **attrs)
    model.graph.node.pop()  # no Relu: compare the Conv itself
    model.graph.output[0].name = "c"
    model.graph.output[0].type.tensor_type.ClearField("shape")
    (Y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": X}
    )
    g = geometry(W.shape, attrs)
    P = patches(X, g, max_rows=10**9)
    Y_p = (P @ W.reshape(5, -1).T + B).reshape(2, Y.shape[2], Y.shape[3], 5).transpose(0, 3, 1, 2)
    assert rel_l2(Y_p, Y) <= tol(F32), f"{attrs}: {rel_l2(Y_p, Y)}"


def test_patches_subsample_is_seeded_and_bounded():
    X = np.random.default_rng(2).standard_normal((4, 3, 20, 20), dtype=F32)
    g = geometry((5, 3, 3, 3), {"pads": [1, 1, 1, 1]})
    a, b = patches(X, g, max_rows=100), patches(X, g, max_rows=100)
    assert a.shape == (100, 27) and np.array_equal(a, b)


def test_full_rank_factorizations_reconstruct_the_filters():
    W = np.random.default_rng(3).standard_normal((6, 4, 3, 5), dtype=F32)
    v, h = spatial_factors(spatial_svd(W), W.shape, min(4 * 3, 6 * 5))
    assert v.shape == (12, 4, 3, 1) and h.shape == (6, 12, 1, 5)
    assert rel_l2(spatial_weight(v, h), W) <= tol(F32)
    first, core, last = tucker_factors(W, tucker_bases(W), 6, 4)
    assert first.shape == (4, 4, 1, 1) and core.shape == (6, 4, 3, 5) and last.shape == (6, 6, 1, 1)
    assert rel_l2(tucker_weight(first, core, last), W) <= tol(F32)


def test_spatial_error_falls_with_rank():
    W = np.random.default_rng(4).standard_normal((8, 6, 3, 3), dtype=F32)
    svd = spatial_svd(W)
    A = W.reshape(8, -1)
    errs = [
        output_error(None, A, spatial_weight(*spatial_factors(svd, W.shape, r)).reshape(8, -1), None)
        for r in range(1, 19)
    ]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] <= 1e-5


# ----------------------------------------------------------------------------------------------- pass


@pytest.mark.parametrize("kind", ["channel", "spatial", "tucker"])
@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 1, 1, 1]},
        {"pads": [0, 1, 2, 1], "strides": [2, 2]},
        {"pads": [2, 2, 2, 2], "dilations": [2, 2]},
    ],
)
def test_each_scheme_finds_its_structure(kind, attrs):
    W = structured(kind)
    B = (0.1 * np.random.default_rng(5).standard_normal(W.shape[0])).astype(F32)
    model = conv_model(W, B, **attrs)
    result, feeds = _run(model, schemes=kind)
    (r,) = [r for r in result.records if r.node == "conv"]
    assert r.status == "applied" and r.detail["scheme"] == kind, (kind, attrs, r)
    assert r.params_after < r.params_before and r.flops_after < r.flops_before
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Conv") == (3 if kind == "tucker" else 2), ops
    onnx.checker.check_model(result.model)
    err = max(e.rel_l2 for e in compare_models(model, result.model, feeds))
    assert err <= 1e-2, f"{kind} {attrs}: {err}"


def test_all_schemes_pick_the_smallest_that_fits():
    W = structured("spatial", M=32, C=32, rank=2)
    model = conv_model(W, np.zeros(32, F32))
    result, _ = _run(model)
    (r,) = result.records
    assert r.status == "applied" and r.detail["scheme"] == "spatial", r


def test_fixed_rank_uses_the_channel_scheme():
    W = np.random.default_rng(6).standard_normal((8, 4, 3, 3), dtype=F32)
    model = conv_model(W, np.zeros(8, F32))
    result, _ = _run(model, max_error=1.0, rank="5")
    (r,) = result.records
    assert r.status == "applied" and (r.detail["scheme"], r.detail["rank"]) == ("channel", 5), r


def test_conv_factorization_is_opt_in():
    model = conv_model(structured("channel"), np.zeros(24, F32))
    feeds = synthetic_inputs(model, samples=2)
    result = optimize(model, [LowRank()], feeds, OutputBudget(model, feeds))
    (r,) = result.records
    assert r.status == "declined" and "--set lowrank.conv=1" in r.reason


@pytest.mark.parametrize(
    "attrs,reason", [({"group": 2}, "group=2"), ({"auto_pad": "SAME_UPPER"}, "auto_pad")]
)
def test_unsupported_convs_declined_with_reason(attrs, reason):
    W = structured("channel", M=8, C=8)
    if attrs.get("group"):
        W = W[:, :4]
    model = conv_model(W, np.zeros(8, F32), **attrs)
    result, _ = _run(model)
    (r,) = result.records
    assert r.status == "declined" and reason in r.reason, r.reason
