"""acdc pass: the ALS fit on its own (exact recovery of a depth-1 stack, error non-increasing over sweeps,
falling with depth on a depth-2 stack), then the pass on an MLP whose first layer IS an ACDC stack (applied,
within budget) and on a random dense layer (declined with the error it would cost)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import numpy_helper

from models.synthetic import mlp
from onnxopt.budget import OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.manager import optimize
from onnxopt.passes.acdc import ACDC, fit, fit_als, padded_size, permutations
from onnxopt.reference.acdc import dct_matrix, dense_weight
from onnxopt.verify import compare_models


def _run(model, max_error=1e-2, settings=None, samples=64):
    feeds = synthetic_inputs(model, samples=samples, seed=1)
    budget = OutputBudget(model, feeds, max_error)
    return optimize(model, [ACDC()], feeds, budget, max_error=max_error, settings=settings), feeds


def _stack(L: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    A = 1 + 0.5 * rng.standard_normal((L, n))
    D = 1 + 0.5 * rng.standard_normal((L, n))
    return A, D, permutations(L, n)


def test_dct_reference_is_orthonormal_and_inverts():
    for n in (4, 32, 128):
        C = dct_matrix(n)
        np.testing.assert_allclose(C @ C.T, np.eye(n), atol=1e-12)
        np.testing.assert_allclose(C.T @ C, np.eye(n), atol=1e-12)
        # A = D = 1: every layer is C^T C = I, the stack only permutes.
        P = permutations(3, n)
        W = dense_weight(np.ones((3, n)), np.ones((3, n)), P)
        assert set(np.round(W, 9).ravel()) == {0.0, 1.0} and np.allclose(W.sum(0), 1.0)


def test_padded_size_and_permutations():
    assert padded_size(96, 80) == 128 and padded_size(64, 64) == 64 and padded_size(65, 3) == 128
    P = permutations(4, 16)
    assert (P[0] == np.arange(16)).all() and all(sorted(p) == list(range(16)) for p in P)
    assert (permutations(2, 16) == P[:2]).all()  # deeper stacks extend the shallower ones' permutations


def test_depth_one_stack_is_recovered():
    n = 64
    A, D, P = _stack(1, n, 0)
    W = dense_weight(A, D, P, 48)
    X = np.random.default_rng(1).standard_normal((256, n))
    _, _, history = fit_als(X, X @ W, 1, sweeps=8, P=P)
    assert history[-1] < 1e-6, history


def test_sweeps_never_increase_the_error_and_depth_helps():
    n = 64
    A, D, P = _stack(2, n, 2)
    W = dense_weight(A, D, P, n)
    X = np.random.default_rng(3).standard_normal((256, n))
    _, _, h2 = fit_als(X, X @ W, 2, sweeps=6, P=P)
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(h2)), h2
    assert h2[-1] < 0.1, h2
    _, _, h1 = fit_als(X, X @ W, 1, sweeps=6)
    assert h2[-1] < 0.5 * h1[-1], (h1[-1], h2[-1])  # a depth-1 stack cannot express it; depth 2 can


def test_random_layer_error_falls_with_depth_but_stays_large():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((96, 80))
    X = rng.standard_normal((256, 96))
    errors = [fit(W, X, None, L, sweeps=4)[3] for L in (1, 2, 4)]
    assert errors[-1] < errors[0] and min(errors) > 0.5, errors


def _acdc_mlp() -> onnx.ModelProto:
    """mlp 128 -> 96 -> 10 whose first weight is replaced by an exact depth-1 ACDC stack (n = 128)."""
    model = mlp([128, 96, 10], seed=5)
    A, D, P = _stack(1, 128, 6)
    W = (dense_weight(A, D, P, 96) / 4).astype(np.float32)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "W0":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(W, "W0"))
    return model


def test_acdc_layer_is_found_and_within_budget():
    model = _acdc_mlp()
    result, feeds = _run(model, max_error=1e-3)
    fc0 = next(r for r in result.records if r.node == "fc0")
    assert fc0.status == "applied", [r.as_dict() for r in result.records]
    assert fc0.detail["depth"] == 1 and fc0.detail["padded"] == 128
    assert fc0.params_after < fc0.params_before / 20
    onnx.checker.check_model(result.model)
    assert [n.op_type for n in result.model.graph.node].count("ACDCMatMul") == 1
    errs = compare_models(model, result.model, feeds)
    assert max(e.rel_l2 for e in errs) <= 1e-3, errs
    fc1 = next(r for r in result.records if r.node == "fc1")
    assert fc1.status == "declined" and "too small" in fc1.reason


def test_padding_pads_the_input():
    # K = 80 < n = 128: X is zero-padded (Pad); N = 96 is set by the emitted B, so no Slice is needed.
    model = mlp([80, 96, 10], seed=8)
    result, feeds = _run(model, max_error=10.0, settings={"acdc": {"depth": "1", "sweeps": "2"}})
    fc0 = next(r for r in result.records if r.node == "fc0")
    assert fc0.status == "applied" and fc0.detail["padded"] == 128, fc0.as_dict()
    onnx.checker.check_model(result.model)
    ops = [n.op_type for n in result.model.graph.node]
    assert "Pad" in ops and "ACDCMatMul" in ops and "Slice" not in ops, ops
    assert max(e.rel_l2 for e in compare_models(model, result.model, feeds)) < 2.0


def test_random_dense_layer_is_declined_with_reason():
    model = mlp([64, 64, 10], decay=1.0)
    result, _ = _run(model, settings={"acdc": {"sweeps": "3"}})
    assert not result.changed
    fc0 = next(r for r in result.records if r.node == "fc0")
    assert fc0.status in ("declined", "undone") and "ACDC stack" in fc0.reason, fc0.as_dict()
    assert "L=1:" in fc0.reason
