"""prune's sparse execution: SparseGemm / SparseConv emitted in place of dense pruned weights, exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from models.synthetic import conv_net, mlp
from onnxopt.budget import OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.library import session_for
from onnxopt.manager import optimize, plan
from onnxopt.passes.prune import Prune


def _run(model, settings, max_error=10.0, samples=32):
    feeds = synthetic_inputs(model, samples=samples, seed=1)
    budget = OutputBudget(model, feeds, max_error)
    return optimize(model, [Prune()], feeds, budget, max_error, settings={"prune": settings}), feeds


def _outputs(model, feeds):
    return session_for(model, 1).run(None, feeds)[0]


@pytest.mark.parametrize(
    "model,op",
    [
        (mlp([40, 72, 24, 10], seed=3), "SparseGemm"),
        (mlp([40, 72, 24, 10], seed=3, use_gemm=False), "SparseGemm"),
        (mlp([40, 72, 24, 10], seed=3, trans_b=True), "SparseGemm"),
        (conv_net([8, 20, 12], size=9, kernel=3, pads=1), "SparseConv"),
        (conv_net([8, 20, 12], size=9, kernel=3, pads=0, strides=2), "SparseConv"),
    ],
)
def test_sparse_execution_matches_the_dense_pruned_model(model, op):
    fixed = {"sparsity": "0.8", "min_k": "1"}
    sparse, feeds = _run(model, {**fixed, "sparse": "1"})
    dense, _ = _run(model, {**fixed, "sparse": "0"})
    ops = [n.op_type for n in sparse.model.graph.node]
    assert op in ops, ops
    assert op not in [n.op_type for n in dense.model.graph.node]
    onnx.checker.check_model(sparse.model, full_check=True)
    for r in sparse.records:
        if r.status == "applied":
            assert r.detail["emitted"] == "sparse"
            assert r.flops_after == 2 * r.detail["nnz"] * (r.flops_before // (2 * np.prod(r.detail["shape"])))
            assert r.bytes_after < r.bytes_before
    y_sparse, y_dense = _outputs(sparse.model, feeds), _outputs(dense.model, feeds)
    scale = np.abs(y_dense).max()
    np.testing.assert_allclose(y_sparse, y_dense, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("sparsity,expect", [("0.5", "dense"), ("0.9", "sparse")])
def test_without_timing_sparse_from_the_threshold_up(sparsity, expect):
    model = mlp([64, 96, 10], seed=4)
    result, _ = _run(model, {"sparsity": sparsity, "measure": "0"})
    applied = [r for r in result.records if r.status == "applied"]
    assert applied and all(r.detail["emitted"] == expect for r in applied), [r.detail for r in applied]


def test_measured_choice_records_its_timings():
    model = mlp([256, 256, 10], seed=5)
    result, _ = _run(model, {"sparsity": "0.9"})
    fc0 = next(r for r in result.records if r.node == "fc0")
    assert fc0.status == "applied"
    assert fc0.detail["emitted"] in ("sparse", "dense")
    assert fc0.detail["ms_dense"] > 0 and fc0.detail["ms_sparse_est"] > 0


def test_unknown_sparse_mode_is_declined_with_the_reason():
    result, _ = _run(mlp([64, 96, 10]), {"sparsity": "0.9", "sparse": "maybe"})
    assert not result.changed
    assert all("prune.sparse='maybe'" in r.reason for r in result.records if r.node.startswith("fc"))


def _fixed_times(monkeypatch, layer, before, after):
    """Every layer timing gives `layer` (dense, then the sparse probes); the whole model `before`, `after`."""
    import onnxopt.bench
    import onnxopt.passes.prune_sparse

    fixed = lambda models, threads: layer[: len(models)]  # noqa: E731
    monkeypatch.setattr(onnxopt.passes.prune_sparse, "median_times", fixed)

    def latency(models, feeds, threads=1, rounds=0, **kw):
        return [{"median_ms": before}, {"median_ms": after}]

    monkeypatch.setattr(onnxopt.bench, "latency", latency)


@pytest.mark.parametrize("after,emitted", [(2.0, "sparse"), (2.95, "dense")])
def test_sparse_layers_fall_back_to_dense_when_the_whole_model_is_not_faster(monkeypatch, after, emitted):
    _fixed_times(monkeypatch, [1.0, 0.5, 0.5], before=3.0, after=after)  # each layer 2x faster sparse
    model = mlp([64, 96, 10], seed=4)
    result, feeds = _run(model, {"sparsity": "0.9", "min_k": "1"})
    applied = [r for r in result.records if r.status == "applied"]
    assert applied and all(r.detail["emitted"] == emitted for r in applied), [r.detail for r in applied]
    ops = {n.op_type for n in result.model.graph.node}
    assert ("SparseGemm" in ops) == (emitted == "sparse"), ops
    for r in applied:
        assert r.detail["sparsity"] >= 0.89  # pruned either way: only the form differs
        if emitted == "dense":
            why = "emitted dense: the whole model ran 2.950 ms against 3.000 ms"
            assert r.reason.startswith(why), r.reason
            assert r.bytes_after == r.bytes_before and r.flops_after == r.flops_before
    y = _outputs(result.model, feeds)
    assert np.isfinite(y).all()


def test_forced_sparse_is_not_timed_as_a_whole(monkeypatch):
    import onnxopt.bench

    def fail(*a, **k):
        raise AssertionError("the whole model was timed although prune.sparse=1")

    monkeypatch.setattr(onnxopt.bench, "latency", fail)
    result, _ = _run(mlp([64, 96, 10], seed=4), {"sparsity": "0.9", "sparse": "1", "min_k": "1"})
    assert all(r.detail["emitted"] == "sparse" for r in result.records if r.status == "applied")


def test_latency_objective_offers_only_faster_levels_with_their_saving(monkeypatch):
    _fixed_times(monkeypatch, [1.0, 0.4, 1.2], before=3.0, after=2.0)  # sparse faster at the sparse end only
    model = mlp([64, 96, 10], seed=4)
    feeds = synthetic_inputs(model, samples=32, seed=1)
    candidates, _ = plan(model, [Prune()], feeds, 10.0, {"prune": {"objective": "latency", "min_k": "1"}})
    assert candidates
    for c in candidates:
        assert all(o.detail["emitted"] == "sparse" and o.speed_only and o.fallback is None for o in c.options)
        assert all(
            o.ms_saved == pytest.approx(o.detail["ms_dense"] - o.detail["ms_sparse_est"]) for o in c.options
        )
        assert all(o.ms_saved > 0 for o in c.options)
    sized, _ = plan(model, [Prune()], feeds, 10.0, {"prune": {"min_k": "1"}})
    fewer = [len(c.options) < len(s.options) for c, s in zip(candidates, sized, strict=True)]
    assert any(fewer), "the dense-end levels, no faster sparse, must not be offered"


def test_latency_objective_undoes_sparse_layers_when_the_model_is_not_faster(monkeypatch):
    _fixed_times(monkeypatch, [1.0, 0.5, 0.5], before=3.0, after=2.95)
    result, _ = _run(mlp([64, 96, 10], seed=4), {"sparsity": "0.9", "min_k": "1", "objective": "latency"})
    assert not result.changed
    fcs = [r for r in result.records if r.node.startswith("fc")]
    assert fcs and all(r.status == "undone" and "whole model ran 2.950 ms" in r.reason for r in fcs), fcs


def test_latency_objective_declines_layers_that_are_no_faster_sparse(monkeypatch):
    _fixed_times(monkeypatch, [1.0, 1.0, 1.0], before=3.0, after=3.0)
    result, _ = _run(mlp([64, 96, 10], seed=4), {"sparsity": "0.9", "min_k": "1", "objective": "latency"})
    assert not result.changed
    fcs = [r for r in result.records if r.node.startswith("fc")]
    assert fcs and all(r.reason.startswith("no sparsity level runs faster") for r in fcs), fcs


@pytest.mark.parametrize("settings", [{"objective": "latency", "measure": "0"}, {"objective": "speed"}])
def test_latency_objective_needs_timing_and_a_known_objective(settings):
    result, _ = _run(mlp([64, 96, 10], seed=4), {"sparsity": "0.9", **settings})
    assert not result.changed
    assert all("prune." in r.reason for r in result.records if r.node.startswith("fc")), result.records
