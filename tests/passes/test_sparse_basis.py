"""sparse_basis: the numpy fits on their own (exact recovery, monotonicity, the basis update), then the pass
on small graphs (op types, checker, numerics within the budget, SparseConv in onnxruntime with the library,
strides/pads/dilations, bias), and its declines."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.synthetic import OPSET, conv_net
from onnxopt.budget import OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.manager import optimize
from onnxopt.passes import sparse_basis_fit as sbf
from onnxopt.passes.prune_fit import from_csr
from onnxopt.passes.sparse_basis import SparseBasis
from onnxopt.verify import compare_models


def _sparse(rng: np.random.Generator, shape: tuple[int, int], density: float) -> np.ndarray:
    return rng.standard_normal(shape) * (rng.random(shape) < density)


def _correlated(rng: np.random.Generator, n: int, K: int, rank: int = 12) -> np.ndarray:
    X = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, K)) + 0.1 * rng.standard_normal((n, K))
    return X * np.exp(rng.uniform(-1.0, 1.0, K))


def _rel(A: np.ndarray, A_hat: np.ndarray, H: np.ndarray) -> float:
    d = A - A_hat
    return float(np.sqrt(np.sum((d @ H) * d) / np.sum((A @ H) * A)))


# ------------------------------------------------------------------------------------------------ the fits


def test_sparse_code_recovers_sparse_coefficients_exactly():
    rng = np.random.default_rng(0)
    D = rng.standard_normal((10, 60))
    S = _sparse(rng, (40, 10), 0.3)
    H = sbf.metric(_correlated(rng, 500, 60), 60)
    G, F = sbf.normal_equations(S @ D, D, H)
    S_hat = sbf.sparse_code(G, F, int(np.count_nonzero(S)))
    np.testing.assert_allclose(S_hat, S, atol=1e-6)


def test_sparse_code_finds_the_support_under_noise():
    rng = np.random.default_rng(1)
    D = rng.standard_normal((12, 50))
    S = _sparse(rng, (30, 12), 0.25) * 3.0
    A = S @ D + 0.01 * rng.standard_normal((30, 50))
    G, F = sbf.normal_equations(A, D, np.eye(50))
    S_hat = sbf.sparse_code(G, F, int(np.count_nonzero(S)))
    assert np.array_equal(S_hat != 0, S != 0)


def test_refit_support_is_least_squares_on_each_support():
    rng = np.random.default_rng(2)
    D, A = rng.standard_normal((6, 20)), rng.standard_normal((5, 20))
    G, F = sbf.normal_equations(A, D, np.eye(20))
    mask = rng.random((5, 6)) < 0.5
    mask[0] = False  # an empty row stays zero
    S = sbf.refit_support(G, F, mask)
    assert not S[0].any() and np.all(S[~mask] == 0)
    for i in range(1, 5):
        m = mask[i]
        expected = np.linalg.lstsq(D[m].T, A[i], rcond=None)[0]
        np.testing.assert_allclose(S[i, m], expected, rtol=1e-6, atol=1e-9)


def test_update_basis_is_optimal_for_fixed_coefficients():
    rng = np.random.default_rng(3)
    A, S = rng.standard_normal((30, 40)), _sparse(rng, (30, 8), 0.5)
    H = sbf.metric(_correlated(rng, 300, 40), 40)
    D = sbf.update_basis(A, S)
    best = _rel(A, S @ D, H)
    for _ in range(5):  # any perturbation of the basis fits worse, in any metric
        assert _rel(A, S @ (D + 1e-3 * rng.standard_normal(D.shape)), H) > best


def test_fit_is_exact_on_a_sparse_times_basis_bank_at_full_density():
    rng = np.random.default_rng(4)
    A = _sparse(rng, (24, 6), 0.4) @ rng.standard_normal((6, 45))
    layer = sbf.prepare(A, sbf.metric(_correlated(rng, 400, 45), 45))
    f = sbf.fit(layer, 6, 24 * 6)
    assert f.train_error < 1e-6 and _rel(A, f.coef @ f.basis, layer.H) < 1e-5


def test_fit_beats_the_truncated_svd_at_the_same_nonzeros():
    """Dictionary learning in the metric finds sparse structure that masking the SVD's coefficients loses."""
    rng = np.random.default_rng(5)
    A = _sparse(rng, (48, 12), 0.25) @ rng.standard_normal((12, 72)) + 0.01 * rng.standard_normal((48, 72))
    layer = sbf.prepare(A, np.eye(72))
    nnz = int(0.25 * 48 * 12)
    f = sbf.fit(layer, 12, nnz)
    D, S = sbf.weighted_basis(layer, 12)
    masked = np.where(sbf.top_mask(S**2, nnz), S, 0.0)
    assert f.train_error < 0.6 * _rel(A, masked @ D, layer.H)


def test_more_nonzeros_and_more_basis_less_error():
    rng = np.random.default_rng(6)
    A = rng.standard_normal((32, 12)) @ rng.standard_normal((12, 54)) + 0.3 * rng.standard_normal((32, 54))
    layer = sbf.prepare(A, sbf.metric(_correlated(rng, 600, 54), 54))
    by_nnz = [sbf.fit(layer, 8, nnz).train_error for nnz in (16, 32, 64, 128, 256)]
    assert by_nnz == sorted(by_nnz, reverse=True), by_nnz
    by_basis = [sbf.fit(layer, B, 4 * 32).train_error for B in (4, 6, 8, 12, 16)]
    assert by_basis == sorted(by_basis, reverse=True), by_basis
    for B, nnz in ((4, 64), (8, 200)):
        assert np.count_nonzero(sbf.fit(layer, B, nnz).coef) <= nnz


def _channel_bank(rng: np.random.Generator, N: int, C: int, q: int, density: float) -> np.ndarray:
    """A [N, C 9]: filters that combine q 3x3 kernels per input channel with sparse coefficients."""
    kernels = rng.standard_normal((C, q, 9))
    D = np.zeros((C * q, C * 9))
    for c in range(C):
        D[c * q : (c + 1) * q, c * 9 : (c + 1) * 9] = kernels[c]
    return _sparse(rng, (N, C * q), density) @ D


def test_channel_basis_is_block_diagonal_and_recovers_one_kernel_per_channel():
    rng = np.random.default_rng(8)
    A = _channel_bank(rng, 20, 6, 1, 0.4)
    H = sbf.metric(_correlated(rng, 400, 54), 54)
    D = sbf.channel_basis(A, H, 6, 1)
    assert D.shape == (6, 54)
    assert all(not D[c, : c * 9].any() and not D[c, (c + 1) * 9 :].any() for c in range(6))
    f = sbf.fit_basis(A, H, D, int(np.count_nonzero(A.reshape(20, 6, 9).any(axis=2))))
    assert f.train_error < 1e-6


def test_channel_form_more_kernels_less_error():
    rng = np.random.default_rng(9)
    A = rng.standard_normal((16, 5 * 9))
    H = np.eye(45)
    errors = [
        sbf.fit_basis(A, H, sbf.channel_basis(A, H, 5, q), 16 * 5 * q // 2).train_error for q in (1, 2, 4, 8)
    ]
    assert errors == sorted(errors, reverse=True), errors


# ------------------------------------------------------------------------------------------------ the pass


def _conv_model(
    N: int = 24,
    C: int = 8,
    B: int = 6,
    density: float = 0.4,
    strides=(1, 1),
    dilations=(1, 1),
    bias=True,
    per_channel: int = 0,
) -> onnx.ModelProto:
    """x [n, C, 11, 10] -> Conv 3x3 (pads 1 2 1 0) whose filters are sparse combinations of B basis filters
    (or of `per_channel` kernels per input channel), plus a little noise: what sparse_basis compresses."""
    rng = np.random.default_rng(7)
    if per_channel:
        A = _channel_bank(rng, N, C, per_channel, density)
    else:
        A = _sparse(rng, (N, B), density) @ rng.standard_normal((B, C * 9))
    A += 0.002 * rng.standard_normal((N, C * 9))
    inits = [numpy_helper.from_array((A / np.sqrt(C * 9)).reshape(N, C, 3, 3).astype(np.float32), "W")]
    inputs = ["x", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node(
        "Conv",
        inputs,
        ["y"],
        name="conv",
        kernel_shape=[3, 3],
        pads=[1, 2, 1, 0],
        strides=list(strides),
        dilations=list(dilations),
    )
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, C, 11, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N, "H", "W"])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _run(model, max_error=0.05, settings=None, samples=8):
    feeds = synthetic_inputs(model, samples=samples, seed=1)
    budget = OutputBudget(model, feeds, max_error)
    result = optimize(
        model, [SparseBasis()], feeds, budget, max_error, settings={"sparse_basis": settings or {}}
    )
    return result, feeds


def _checked(model, result, feeds, max_error) -> float:
    onnx.checker.check_model(result.model, full_check=True)
    onnx.shape_inference.infer_shapes(result.model, strict_mode=True)
    worst = max(e.rel_l2 for e in compare_models(model, result.model, feeds))  # runs the library's ops
    assert worst <= max_error, worst
    return worst


@pytest.mark.parametrize(
    "strides,dilations,bias", [((1, 1), (1, 1), True), ((2, 1), (1, 1), False), ((1, 1), (2, 1), True)]
)
def test_conv_becomes_basis_conv_and_sparse_combination(strides, dilations, bias):
    model = _conv_model(strides=strides, dilations=dilations, bias=bias)
    result, feeds = _run(model, settings={"sparse": "1"})
    (rec,) = result.records
    assert rec.status == "applied", rec.as_dict()
    _checked(model, result, feeds, 0.05)
    basis, combine = result.model.graph.node
    assert (basis.op_type, combine.op_type, combine.domain) == ("Conv", "SparseConv", "onnxopt")
    attrs = {a.name: list(a.ints) for a in basis.attribute if a.ints}
    assert attrs["strides"] == list(strides) and attrs["dilations"] == list(dilations)
    assert attrs["pads"] == [1, 2, 1, 0] and len(basis.input) == 2  # the bias moves to the combination
    assert len(combine.input) == (5 if bias else 4)
    w = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    B = rec.detail["basis"]
    assert w[basis.input[1]].shape == (B, 8, 3, 3) and B < 24
    S = from_csr(w[combine.input[1]], w[combine.input[2]], w[combine.input[3]], B).T  # [N, B]
    assert np.count_nonzero(S) == rec.detail["nnz"] < 24 * B
    assert rec.params_after < rec.params_before and rec.flops_after < rec.flops_before
    assert rec.bytes_after == 4 * B * 72 + 8 * rec.detail["nnz"] + 8 * 25 + (4 * 24 if bias else 0)


def test_channel_form_is_a_grouped_basis_conv_and_sparse_combination():
    model = _conv_model(N=32, C=6, per_channel=2, density=0.15)
    result, feeds = _run(model, settings={"form": "channel"})
    (rec,) = result.records
    assert rec.status == "applied", rec.as_dict()
    _checked(model, result, feeds, 0.05)
    basis, combine = result.model.graph.node
    assert (basis.op_type, combine.op_type) == ("Conv", "SparseConv") and rec.detail["form"] == "channel"
    q = rec.detail["basis"]
    assert next(a.i for a in basis.attribute if a.name == "group") == 6
    w = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert w[basis.input[1]].shape == (6 * q, 1, 3, 3) and q < 9
    assert rec.params_after < rec.params_before / 2


def test_dense_combination_is_a_1x1_conv():
    model = _conv_model()
    result, feeds = _run(model, settings={"sparse": "0"})
    assert result.records[0].status == "applied", result.records[0].as_dict()
    _checked(model, result, feeds, 0.05)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Conv"]
    assert result.records[0].detail["emitted"] == "dense"


def test_options_most_compressive_first_with_falling_error():
    from onnxopt.manager import plan

    model = _conv_model()
    feeds = synthetic_inputs(model, samples=8, seed=1)
    candidates, _ = plan(model, [SparseBasis()], feeds, max_error=1.0, settings={})
    (c,) = candidates
    sizes = [o.bytes_after for o in c.options]
    errors = [o.est_error for o in c.options]
    assert len(sizes) >= 3 and sizes == sorted(sizes) and errors == sorted(errors, reverse=True)
    assert all(o.flops_after < c.record.flops_before for o in c.options)


def test_tighter_budget_keeps_more():
    model = _conv_model(density=0.6)
    kept = []
    for max_error in (0.3, 0.1, 0.02):
        result, feeds = _run(model, max_error=max_error)
        rec = result.records[0]
        assert rec.status == "applied", rec.as_dict()
        _checked(model, result, feeds, max_error)
        kept.append(rec.params_after)
    assert kept == sorted(kept) and kept[0] < kept[-1], kept


def test_declines_with_reasons():
    reasons = lambda m, **kw: {r.node: r.reason for r in _run(m, **kw)[0].records if r.status == "declined"}  # noqa: E731
    assert "group=2" in reasons(conv_net([8, 8, 8], size=8, group=2), samples=2)["conv0"]
    assert "1x1" in reasons(conv_net([8, 8], size=6, kernel=1, pads=0), samples=2)["conv0"]
    # random filters have no sparse basis: nothing within the budget that saves bytes and FLOPs
    random = reasons(conv_net([4, 6], size=6), samples=2)["conv0"]
    assert random, random

    shared = _conv_model()
    shared.graph.node.append(
        helper.make_node("Conv", ["x", "W"], ["y2"], name="twin", kernel_shape=[3, 3], pads=[1, 2, 1, 0])
    )
    shared.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 24, "H", "W"]))
    assert "shared" in reasons(shared)["conv"]

    computed = _conv_model()
    computed.graph.node.insert(0, helper.make_node("Identity", ["W"], ["W_live"], name="live"))
    computed.graph.node[1].input[1] = "W_live"
    assert "not a constant" in reasons(computed)["conv"]
    assert "not auto" in reasons(_conv_model(), settings={"sparse": "yes"})["conv"]


def test_registered_after_prune_and_opt_in():
    from onnxopt.passes import METHODS, default_methods

    names = list(METHODS)
    assert METHODS["sparse_basis"] is SparseBasis and names.index("sparse_basis") == names.index("prune") + 1
    assert "sparse_basis" not in default_methods()
