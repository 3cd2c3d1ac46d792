"""lowrank: the numpy factorization, its error estimate, and the pass on small graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from models.synthetic import dense_weight, mlp
from onnxopt.budget import OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.manager import optimize
from onnxopt.passes.lowrank import MIN_GAIN, LowRank, error_by_rank, factorize, fit, max_useful_rank
from onnxopt.verify import compare_models


def _run(model, max_error=1e-2, settings=None, samples=16):
    feeds = synthetic_inputs(model, samples=samples, seed=1)
    budget = OutputBudget(model, feeds, max_error)
    return optimize(model, [LowRank()], feeds, budget, max_error=max_error, settings=settings), feeds


def test_factorize_full_rank_is_exact():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((13, 7)).astype(np.float32)
    U, V = factorize(W, 7)
    assert U.shape == (13, 7) and V.shape == (7, 7)
    np.testing.assert_allclose(U @ V, W, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_x", [False, True])
def test_error_by_rank_matches_direct_computation(with_x):
    rng = np.random.default_rng(1)
    W = dense_weight(rng, 24, 17, decay=0.8)
    X = rng.standard_normal((50, 24)).astype(np.float32) if with_x else None
    err = error_by_rank(W, X, None)
    for r in (1, 5, 12):
        U, V = factorize(W, r)
        if with_x:
            direct = np.linalg.norm(X @ (W - U @ V)) / np.linalg.norm(X @ W)
        else:
            direct = np.linalg.norm(W - U @ V) / np.linalg.norm(W)
        assert err[r] == pytest.approx(direct, rel=1e-4), f"rank {r} with_x={with_x}"


def test_error_decreases_with_rank():
    rng = np.random.default_rng(2)
    W = dense_weight(rng, 40, 30, decay=0.9)
    X = rng.standard_normal((64, 40))
    err = error_by_rank(W, X, None)
    assert np.all(np.diff(err) <= 1e-12), err
    assert err[0] == pytest.approx(1.0) and err[-1] == pytest.approx(0.0, abs=1e-7)


def test_max_useful_rank_cuts_params():
    for k, n in [(64, 64), (100, 10), (7, 5)]:
        r = max_useful_rank(k, n)
        assert r * (k + n) * MIN_GAIN <= k * n < (r + 1) * (k + n) * MIN_GAIN


@pytest.mark.parametrize("use_gemm,trans_b", [(True, False), (True, True), (False, False)])
def test_pass_rewrites_compressible_layers_within_budget(use_gemm, trans_b):
    model = mlp([64, 96, 80, 10], decay=0.85, use_gemm=use_gemm, trans_b=trans_b)
    result, feeds = _run(model)
    applied = [r for r in result.records if r.status == "applied"]
    assert len(applied) >= 2, [r.as_dict() for r in result.records]
    onnx.checker.check_model(result.model)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("MatMul") >= 2 * len(applied) - (len(applied) if use_gemm else 0)
    for r in applied:
        assert r.bytes_after < r.bytes_before and r.flops_after < r.flops_before, r
        assert r.detail["rank"] < r.detail["shape"][0]
    errs = compare_models(model, result.model, feeds)
    assert max(e.rel_l2 for e in errs) <= 1e-2
    assert sum(r.params_after for r in applied) < sum(r.params_before for r in applied)


def test_pass_declines_incompressible_layer_with_reason():
    model = mlp([64, 64, 10], decay=1.0)  # flat spectrum: no rank under K*N/(K+N) fits 1e-2
    result, _ = _run(model)
    assert not result.changed
    fc0 = next(r for r in result.records if r.node == "fc0")
    assert fc0.status == "declined" and "rank" in fc0.reason


def test_more_rank_less_error():
    model = mlp([64, 96, 10], decay=0.9)
    errors = []
    for rank in (4, 8, 16, 24):
        result, feeds = _run(model, max_error=1.0, settings={"lowrank": {"rank": str(rank)}})
        errors.append(max(e.rel_l2 for e in compare_models(model, result.model, feeds)))
    assert errors == sorted(errors, reverse=True), errors


def test_shared_weight_is_declined():
    model = mlp([32, 32, 32], decay=0.5)
    g = model.graph
    g.node[2].input[1] = g.node[0].input[1]  # second Gemm uses the first one's weight
    result, _ = _run(model)
    reasons = {r.node: r.reason for r in result.records if r.status == "declined"}
    assert "shared" in reasons.get("fc0", "") and "shared" in reasons.get("fc1", "")


def test_input_model_not_modified():
    model = mlp([64, 96, 10], decay=0.8)
    before = model.SerializeToString()
    _run(model)
    assert model.SerializeToString() == before


def test_provenance_metadata_on_new_nodes():
    model = mlp([64, 96, 10], decay=0.8)
    result, _ = _run(model)
    tagged = [n for n in result.model.graph.node if n.metadata_props]
    assert tagged
    for n in tagged:
        props = {p.key: p.value for p in n.metadata_props}
        assert props["onnxopt.method"] == "lowrank" and props["onnxopt.source"] in ("fc0", "fc1")


def test_fixed_rank_fit_takes_the_data_aware_svd_where_it_errs_less():
    # Inputs that live mostly in a few directions: the data-aware SVD keeps what reaches the outputs. With a
    # loose tolerance both fits "fit" at rank 1; a fixed rank must still choose by the error at that rank.
    rng = np.random.default_rng(3)
    K, N, r = 48, 40, 8
    W = rng.standard_normal((K, N)).astype(np.float32)
    X = (rng.standard_normal((512, K)) * np.geomspace(10.0, 0.01, K)).astype(np.float32)
    kind, _, err = fit(W, X, None, tol=1e3, r_max=max_useful_rank(K, N), rank=r)
    _, _, err_plain = fit(W, X, None, tol=1e3, r_max=max_useful_rank(K, N), data_aware=False)
    assert kind == "data-aware" and err[r] < 0.5 * err_plain[r]
