"""tensor_train: the factor split, TT-SVD, the Einsum chain, and the pass on layers that are and are not
low-rank tensor trains."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models.synthetic import mlp
from onnxopt.budget import OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.manager import optimize
from onnxopt.passes.tensor_train import TensorTrain, equations, factorize, tt_svd, tt_weight
from onnxopt.verify import compare_models
from tolerances import rel_l2, tol


@pytest.mark.parametrize(
    "n,d,expected",
    [(4096, 3, [16, 16, 16]), (1024, 2, [32, 32]), (96, 2, [12, 8]), (97, 2, None), (10, 3, None)],
)
def test_factorize(n, d, expected):
    f = factorize(n, d)
    assert f == expected
    if f:
        assert np.prod(f) == n and all(x > 1 for x in f)


@pytest.mark.parametrize("d", [2, 3])
def test_full_rank_tt_svd_reconstructs_and_error_falls_with_rank(d):
    W = np.random.default_rng(d).standard_normal((64, 48))
    ks, ns = factorize(64, d), factorize(48, d)
    assert rel_l2(tt_weight(tt_svd(W, ks, ns, 10**6)), W) <= tol(np.float32)
    errs = [rel_l2(tt_weight(tt_svd(W, ks, ns, r)), W) for r in (1, 2, 4, 8, 16)]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(errs)), errs


@pytest.mark.parametrize("d", [2, 3])
def test_einsum_chain_is_the_matrix_product(d):
    rng = np.random.default_rng(7)
    ks, ns = factorize(64, d), factorize(48, d)
    cores = tt_svd(rng.standard_normal((64, 48)), ks, ns, 3)
    x = rng.standard_normal((5, 64))
    t = x.reshape(-1, *ks)
    for m, (eq, G) in enumerate(zip(equations(d), cores, strict=True)):
        t = np.einsum(eq, t, G if m else G[0])
    assert rel_l2(t.reshape(5, 48), x @ tt_weight(cores)) <= 1e-6


def _tt_layer_mlp(rank: int | None, seed: int = 0) -> onnx.ModelProto:
    """64 -> 96 -> 10 MLP whose first weight is a TT matrix of `rank` (None: a random dense weight)."""
    model = mlp([64, 96, 10], seed=seed)
    W = numpy_helper.to_array(model.graph.initializer[0])
    if rank is not None:
        rng = np.random.default_rng(seed)
        cores = tt_svd(rng.standard_normal(W.shape), factorize(64, 3), factorize(96, 3), rank)
        W = tt_weight(cores)
        W = W / np.linalg.norm(W) * np.sqrt(96)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(W.astype(np.float32), "W0"))
    return model


def _run(model, max_error=1e-2):
    feeds = synthetic_inputs(model, samples=64, seed=2)
    budget = OutputBudget(model, feeds, max_error)
    return optimize(model, [TensorTrain()], feeds, budget, max_error), feeds


def test_tt_layer_is_found_and_stays_within_budget():
    model = _tt_layer_mlp(rank=2)
    result, feeds = _run(model)
    (r,) = [r for r in result.records if r.node == "fc0"]
    assert r.status == "applied" and r.params_after < r.params_before / 4, r
    assert "Einsum" in {n.op_type for n in result.model.graph.node}
    onnx.checker.check_model(result.model)
    assert max(e.rel_l2 for e in compare_models(model, result.model, feeds)) <= 1e-2


def test_tt_layer_on_3d_rows_keeps_leading_dims():
    # A transformer's dense layer: MatMul of [batch, seq, K] by a constant K x N weight.
    rng = np.random.default_rng(5)
    W = tt_weight(tt_svd(rng.standard_normal((64, 96)), factorize(64, 3), factorize(96, 3), 2))
    W = (W / np.linalg.norm(W) * np.sqrt(96)).astype(np.float32)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", 64])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", 96])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
        "g",
        [x],
        [y],
        [numpy_helper.from_array(W, "W")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    feeds = {"x": rng.standard_normal((3, 5, 64)).astype(np.float32)}
    result = optimize(model, [TensorTrain()], feeds, OutputBudget(model, feeds, 1e-2), 1e-2, dims={"seq": 5})
    assert result.changed and "Einsum" in {n.op_type for n in result.model.graph.node}
    onnx.checker.check_model(result.model)
    other = {"x": rng.standard_normal((2, 7, 64)).astype(np.float32)}  # other batch and seq than planned
    assert max(e.rel_l2 for e in compare_models(model, result.model, other)) <= 1e-2


def test_random_layer_is_declined_with_its_errors():
    result, _ = _run(_tt_layer_mlp(rank=None))
    (r,) = [r for r in result.records if r.node == "fc0"]
    assert r.status == "declined" and "no tensor train fits" in r.reason and "d=3 r=2" in r.reason, r.reason


def test_small_and_prime_layers_declined():
    model = mlp([97, 64, 10])
    result, _ = _run(model, max_error=1.0)
    reasons = {r.node: r.reason for r in result.records}
    assert "prime" in reasons["fc0"] and "too small" in reasons["fc1"], reasons
