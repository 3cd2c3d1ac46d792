"""lowrank's output-aware fit: finding the next layer, the two-sided weighted SVD, and its error estimate."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from models.synthetic import dense_weight, mlp
from onnxopt.budget import OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.manager import optimize
from onnxopt.passes.lowrank import LowRank, output_aware_fit, split, weighted_svd
from onnxopt.passes.lowrank_output import NextLayer, next_layer, output_aware_svd, output_weight
from onnxopt.verify import compare_models


def _layers(rng, K=48, N=40, N2=3):
    """Hidden layer with a slowly decaying spectrum and a narrow head: most of dY never reaches z."""
    W = dense_weight(rng, K, N, decay=0.97)
    b = rng.standard_normal(N).astype(np.float32) * 0.1
    W2 = rng.standard_normal((N, N2)).astype(np.float32)
    b2 = rng.standard_normal(N2).astype(np.float32)
    X = rng.standard_normal((400, K)).astype(np.float32)
    return W, b, W2, b2, X


def _head_error(X, W, W_r, b, W2, b2, relu):
    act = (lambda v: np.maximum(v, 0)) if relu else (lambda v: v)
    z = act(X @ W + b) @ W2 + b2
    z_r = act(X @ W_r + b) @ W2 + b2
    return np.linalg.norm(z_r - z) / np.linalg.norm(z)


@pytest.mark.parametrize("relu", [False, True])
def test_output_aware_beats_data_aware_at_the_head(relu):
    rng = np.random.default_rng(3)
    W, b, W2, b2, X = _layers(rng)
    train, held = X[0::2], X[1::2]
    oa = output_aware_svd(W, train, output_weight(train, W, b, NextLayer(W2, b2, relu, None)))
    da = weighted_svd(W, train)
    for r in (3, 6, 10):
        U, V = split(*oa, r)
        Ud, Vd = split(*da, r)
        e_oa = _head_error(held, W, U @ V, b, W2, b2, relu)
        e_da = _head_error(held, W, Ud @ Vd, b, W2, b2, relu)
        assert e_oa < 0.7 * e_da, f"rank {r} relu={relu}: output-aware {e_oa:.3g} vs data-aware {e_da:.3g}"


def test_estimate_is_exact_without_relu_and_decreasing():
    rng = np.random.default_rng(4)
    W, b, W2, b2, X = _layers(rng)
    factors, err = output_aware_fit(W, X, b, NextLayer(W2, b2, False, None))
    assert np.all(np.diff(err) <= 1e-12)
    held = X[1::2]
    # Without a ReLU, tr(dY G dY^T) is exact but for G's damping, which only adds: the estimate is an upper
    # bound, tight while the directions the head reads dominate (ranks below its width).
    for r in (1, 2, 8, 20):
        U, V = split(*factors, r)
        direct = _head_error(held, W, U @ V, b, W2, b2, relu=False)
        assert err[r] >= direct * (1 - 1e-4), f"rank {r}: estimate {err[r]:.3g} < real {direct:.3g}"
        if r < W2.shape[1]:
            assert err[r] == pytest.approx(direct, rel=0.05), f"rank {r}"


def _chain(between: list[str], extra_reader: bool = False) -> tuple[gs.Node, set[str]]:
    x = gs.Variable("x", np.float32, (2, 8))
    t = gs.Variable("h", np.float32)
    first = gs.Node("MatMul", "fc1", inputs=[x, gs.Constant("w1", np.ones((8, 6), np.float32))], outputs=[t])
    nodes = [first]
    for i, op in enumerate(between):
        out = gs.Variable(f"t{i}", np.float32)
        nodes.append(gs.Node(op, f"n{i}", inputs=[t], outputs=[out]))
        t = out
    y = gs.Variable("y", np.float32)
    w2 = gs.Constant("w2", np.ones((6, 4), np.float32))
    nodes.append(gs.Node("Gemm", "fc2", inputs=[t, w2], outputs=[y]))
    outputs = [y]
    if extra_reader:
        outputs.append(nodes[0].outputs[0])
    gs.Graph(nodes=nodes, inputs=[x], outputs=outputs)
    return first, {t.name for t in outputs}


@pytest.mark.parametrize(
    "between,expect_relu", [([], False), (["Relu"], True), (["Identity", "Relu", "Dropout"], True)]
)
def test_next_layer_sees_through_relu_and_identities(between, expect_relu):
    found = next_layer(*_chain(between), 6)
    assert found is not None
    assert found.W2.shape == (6, 4) and found.b2 is None and found.relu is expect_relu


@pytest.mark.parametrize("between,extra", [(["Sigmoid"], False), (["Relu", "Relu"], False), ([], True)])
def test_next_layer_none_when_the_path_is_not_linear_or_shared(between, extra):
    assert next_layer(*_chain(between, extra_reader=extra), 6) is None


@pytest.mark.parametrize("use_gemm", [True, False])
def test_pass_uses_output_aware_fit_through_matmul_bias_add(use_gemm):
    model = mlp([64, 128, 4], decay=0.8, use_gemm=use_gemm)
    feeds = synthetic_inputs(model, samples=256, seed=1)
    result = optimize(model, [LowRank()], feeds, OutputBudget(model, feeds, 1e-2), max_error=1e-2)
    fits = {r.node: r.detail.get("fit") for r in result.records if r.status == "applied"}
    assert fits.get("fc0") == "output-aware", [r.as_dict() for r in result.records]
    errs = compare_models(model, result.model, feeds)
    assert max(e.rel_l2 for e in errs) <= 1e-2


def test_pass_uses_output_aware_fit_and_stays_in_budget():
    model = mlp([64, 128, 4], decay=0.8)
    feeds = synthetic_inputs(model, samples=256, seed=1)
    result = optimize(model, [LowRank()], feeds, OutputBudget(model, feeds, 1e-2), max_error=1e-2)
    fits = {r.node: r.detail.get("fit") for r in result.records if r.status == "applied"}
    assert "output-aware" in fits.values(), [r.as_dict() for r in result.records]
    onnx.checker.check_model(result.model)
    off = optimize(
        model,
        [LowRank()],
        feeds,
        OutputBudget(model, feeds, 1e-2),
        max_error=1e-2,
        settings={"lowrank": {"output_aware": "0"}},
    )
    assert "output-aware" not in {r.detail.get("fit") for r in off.records}
