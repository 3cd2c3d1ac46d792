"""fastfood pass: the Walsh-Hadamard reference and the fit on their own, then the pass on an MLP whose first
layer IS a Fastfood block (found, within budget) and on a random dense layer (declined with the error it
would cost)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from models.synthetic import mlp
from onnxopt.analysis import node_stats
from onnxopt.budget import OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.manager import optimize
from onnxopt.passes.fastfood import Fastfood, fit, fit_stack, fixed_parts, padded_size
from onnxopt.reference.fastfood import dense_weight, fastfood_matmul, fwht, hadamard
from onnxopt.verify import compare_models


def _run(model, max_error=1e-2, settings=None, samples=256):
    feeds = synthetic_inputs(model, samples=samples, seed=1)
    budget = OutputBudget(model, feeds, max_error)
    return optimize(model, [Fastfood()], feeds, budget, max_error=max_error, settings=settings), feeds


def test_hadamard_squares_to_n_identity_and_fwht_is_the_matrix():
    for n in (1, 2, 8, 64):
        H = hadamard(n)
        np.testing.assert_array_equal(H @ H, n * np.eye(n))
        assert set(np.unique(H)) <= {-1.0, 1.0} and np.array_equal(H, H.T)
        X = np.random.default_rng(n).standard_normal((3, n))
        np.testing.assert_allclose(fwht(X), X @ H, atol=1e-12)
        np.testing.assert_allclose(fwht(fwht(X)) / n, X, atol=1e-12)


def test_reference_agrees_with_the_dense_stack():
    B, P = fixed_parts(2, 16)
    rng = np.random.default_rng(2)
    G, S = rng.standard_normal((2, 2, 16))
    W = dense_weight(B, G, S, P, 11, 13)
    X = rng.standard_normal((5, 11))
    np.testing.assert_allclose(fastfood_matmul(X, B, G, S, P, None, 11, 13), X @ W, atol=1e-12)
    # One block by the formula: S H G Pi H B as explicit matrices, acting on column vectors.
    H = hadamard(16)
    V = np.diag(S[0]) @ H @ np.diag(G[0]) @ np.eye(16)[P[0]] @ H @ np.diag(B[0])
    np.testing.assert_allclose(dense_weight(B[:1], G[:1], S[:1], P[:1], 16, 16), V.T, atol=1e-12)


def _fastfood_layer(n: int, seed: int = 3) -> np.ndarray:
    """W (n x n) of one Fastfood block built with the pass's own fixed signs and permutation."""
    B, P = fixed_parts(1, n)
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((1, n))
    S = rng.standard_normal((1, n)) / n
    return dense_weight(B, G, S, P, n, n).astype(np.float32)


def test_fit_recovers_a_fastfood_block_and_its_loss_falls():
    W = _fastfood_layer(64)
    X = np.random.default_rng(4).standard_normal((512, 64))
    *_, err = fit(W, X, None, 1)
    assert err < 1e-4, err
    _, _, _, _, losses = fit_stack(X, X @ W, 1, 64, iters=100)
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    assert losses[-1] > err**2, "100 steps are still short of the full fit's error"


def test_deeper_stacks_fit_a_random_layer_better():
    W = (np.random.default_rng(5).standard_normal((64, 64)) / 8).astype(np.float32)
    X = np.random.default_rng(6).standard_normal((512, 64))
    errors = [fit(W, X, None, d)[-1] for d in (1, 2, 4)]
    assert errors == sorted(errors, reverse=True), errors
    assert errors[0] > 0.5, errors  # and a random layer stays far from any shallow Fastfood stack


def test_padded_size():
    assert padded_size(64, 64) == 64 and padded_size(65, 10) == 128 and padded_size(100, 4000) == 4096


def _fastfood_mlp() -> onnx.ModelProto:
    """mlp 64 -> 64 -> 10 whose first weight is replaced by one Fastfood block."""
    model = mlp([64, 64, 10], seed=5)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "W0":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(_fastfood_layer(64), "W0"))
    return model


def test_fastfood_layer_is_found_and_within_budget():
    model = _fastfood_mlp()
    result, feeds = _run(model, max_error=1e-3)
    fc0 = next(r for r in result.records if r.node == "fc0")
    assert fc0.status == "applied", [r.as_dict() for r in result.records]
    assert fc0.detail["depth"] == 1 and fc0.detail["n"] == 64
    assert fc0.params_after < fc0.params_before / 8
    onnx.checker.check_model(result.model)
    assert [n.op_type for n in result.model.graph.node].count("FastfoodMatMul") == 1
    errs = compare_models(model, result.model, feeds)
    assert max(e.rel_l2 for e in errs) <= 1e-3, errs
    stats = {s.op_type: s for s in node_stats(result.model, {"N": 1})}
    assert 0 < stats["FastfoodMatMul"].flops < 2 * 64 * 64
    fc1 = next(r for r in result.records if r.node == "fc1")
    assert fc1.status == "declined" and "too small" in fc1.reason


def test_random_dense_layer_is_declined_with_its_error():
    model = mlp([64, 64, 10], decay=1.0)
    result, _ = _run(model, settings={"fastfood": {"iters": "60"}})
    assert not result.changed
    fc0 = next(r for r in result.records if r.node == "fc0")
    assert fc0.status in ("declined", "undone") and "not close to a Fastfood stack" in fc0.reason, (
        fc0.as_dict()
    )
    assert "d=1:" in fc0.reason and "d=4:" in fc0.reason, fc0.reason  # each depth tried, with its error
