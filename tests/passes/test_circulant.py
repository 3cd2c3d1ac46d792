"""circulant pass: the fit functions on their own, then the pass on an MLP whose first layer IS
block-circulant (found, exact) and on a random dense layer (declined with the error it would cost)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from models.synthetic import conv_net, mlp
from onnxopt.budget import OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.manager import optimize
from onnxopt.passes.circulant import (
    Circulant,
    block_sizes,
    expand,
    fit,
    fit_data,
    fit_plain,
    project,
    signs,
)
from onnxopt.reference.circulant import circulant_matmul, dense_weight
from onnxopt.verify import compare_models


def _run(model, max_error=1e-2, settings=None, samples=16):
    feeds = synthetic_inputs(model, samples=samples, seed=1)
    budget = OutputBudget(model, feeds, max_error)
    return optimize(model, [Circulant()], feeds, budget, max_error=max_error, settings=settings), feeds


def test_projection_of_a_circulant_matrix_is_itself():
    C = np.random.default_rng(0).standard_normal((3, 2, 8)).astype(np.float32)
    np.testing.assert_allclose(project(expand(C), 8), C, rtol=1e-5, atol=1e-6)


def test_projection_is_the_frobenius_nearest():
    A = np.random.default_rng(1).standard_normal((16, 16))
    C = project(A, 16)
    base = np.linalg.norm(A - expand(C))
    for seed in range(5):  # any other circulant is farther
        other = C + 0.01 * np.random.default_rng(seed).standard_normal(C.shape).astype(np.float32)
        assert np.linalg.norm(A - expand(other)) > base


def test_dense_weight_agrees_with_fit_conventions():
    # W = D P with P from expand(): the reference's dense weight is the same matrix.
    C = np.random.default_rng(2).standard_normal((2, 3, 4)).astype(np.float32)
    s = signs(8)
    np.testing.assert_allclose(dense_weight(C, s), s[:, None] * expand(C))
    np.testing.assert_allclose(fit_plain(dense_weight(C, s), s, 4), C, rtol=1e-5, atol=1e-6)


def test_error_falls_with_smaller_blocks():
    W = np.random.default_rng(3).standard_normal((128, 96)).astype(np.float32)
    errors = [fit(W, None, None, b)[3] for b in (128, 64, 32, 16)]
    assert errors == sorted(errors, reverse=True), errors


def test_data_aware_fit_beats_plain_on_low_dimensional_inputs():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((64, 64)).astype(np.float32)
    X = (rng.standard_normal((512, 8)) @ rng.standard_normal((8, 64))).astype(np.float32)  # rank-8 inputs
    s = signs(64)
    plain = fit_plain(W, s, 16)
    data = fit_data(W, s, 16, X, plain)
    Y = X @ W
    err_plain = np.linalg.norm(Y - circulant_matmul(X, plain, s)) / np.linalg.norm(Y)
    err_data = np.linalg.norm(Y - circulant_matmul(X, data, s)) / np.linalg.norm(Y)
    assert err_data < 0.8 * err_plain, (err_data, err_plain)
    for seed in range(3):  # a least-squares optimum (ridge aside): nearby circulants fit X W worse
        other = data + 0.01 * np.random.default_rng(seed).standard_normal(data.shape).astype(np.float32)
        assert np.linalg.norm(Y - circulant_matmul(X, other, s)) / np.linalg.norm(Y) > err_data


def test_block_sizes_most_compressive_first():
    assert block_sizes(96, 80) == [128, 64, 32, 16]
    assert block_sizes(4096, 4096)[0] == 4096 and block_sizes(8192, 100)[0] == 4096


def _circulant_mlp(b: int) -> onnx.ModelProto:
    """mlp 96 -> 80 -> 10 whose first weight is replaced by an exactly block-circulant D P (block b)."""
    model = mlp([96, 80, 10], seed=5)
    C = (np.random.default_rng(6).standard_normal((96 // b, 80 // b, b)) / np.sqrt(96)).astype(np.float32)
    W = dense_weight(C, signs(96)).astype(np.float32)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "W0":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(W, "W0"))
    return model


def test_block_circulant_layer_is_found_and_exact():
    model = _circulant_mlp(16)
    result, feeds = _run(model, max_error=1e-3)
    fc0 = next(r for r in result.records if r.node == "fc0")
    assert fc0.status == "applied", [r.as_dict() for r in result.records]
    assert fc0.detail["block"] == 16 and fc0.detail["padded"] == [96, 80]
    assert fc0.params_after < fc0.params_before / 8
    onnx.checker.check_model(result.model)
    assert [n.op_type for n in result.model.graph.node].count("CirculantMatMul") == 1
    errs = compare_models(model, result.model, feeds)
    assert max(e.rel_l2 for e in errs) <= 1e-5, errs
    fc1 = next(r for r in result.records if r.node == "fc1")
    assert fc1.status == "declined" and "too small" in fc1.reason


def test_padding_pads_and_crops():
    # K = 80 and N = 96 at block 64: X is zero-padded to 128 columns (Pad) and Y cropped from 128 (Slice).
    model = mlp([80, 96, 10], seed=8)
    result, feeds = _run(model, max_error=10.0, settings={"circulant": {"block": "64"}})
    fc0 = next(r for r in result.records if r.node == "fc0")
    assert fc0.status == "applied" and fc0.detail["padded"] == [128, 128], fc0.as_dict()
    onnx.checker.check_model(result.model)
    ops = [n.op_type for n in result.model.graph.node]
    assert "Pad" in ops and "Slice" in ops and "CirculantMatMul" in ops, ops
    assert max(e.rel_l2 for e in compare_models(model, result.model, feeds)) < 1.5


def test_random_dense_layer_is_declined_with_reason():
    model = mlp([64, 64, 10], decay=1.0)
    result, _ = _run(model)
    assert not result.changed
    fc0 = next(r for r in result.records if r.node == "fc0")
    assert fc0.status in ("declined", "undone") and "block-circulant" in fc0.reason, fc0.as_dict()


def _circulant_pointwise(b: int, size: int = 5) -> onnx.ModelProto:
    """conv_net 96 -> 80 -> 8, 1x1 kernels, the first weight an exactly block-circulant D P (as C x M)."""
    model = conv_net([96, 80, 8], size=size, kernel=1, pads=0, seed=5)
    C = (np.random.default_rng(6).standard_normal((96 // b, 80 // b, b)) / np.sqrt(96)).astype(np.float32)
    W = dense_weight(C, signs(96)).astype(np.float32).T[:, :, None, None].copy()
    for i, init in enumerate(model.graph.initializer):
        if init.name == "W0":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(W, "W0"))
    return model


def test_pointwise_conv_runs_channels_last_and_exact():
    model = _circulant_pointwise(16)
    result, feeds = _run(model, max_error=1e-3)
    conv0 = next(r for r in result.records if r.node == "conv0")
    assert conv0.status == "applied", [r.as_dict() for r in result.records]
    assert conv0.detail["block"] == 16 and conv0.detail["padded"] == [96, 80]
    onnx.checker.check_model(result.model)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Transpose") == 2 and ops.count("CirculantMatMul") == 1, ops
    assert max(e.rel_l2 for e in compare_models(model, result.model, feeds)) <= 1e-5
    conv1 = next(r for r in result.records if r.node == "conv1")
    assert conv1.status == "declined" and "too small" in conv1.reason


def test_padded_pointwise_conv_pads_channels_and_crops():
    model = conv_net([80, 96, 8], size=4, kernel=1, pads=0, seed=8)
    result, feeds = _run(model, max_error=10.0, settings={"circulant": {"block": "64"}})
    conv0 = next(r for r in result.records if r.node == "conv0")
    assert conv0.status == "applied" and conv0.detail["padded"] == [128, 128], conv0.as_dict()
    onnx.checker.check_model(result.model, full_check=True)
    assert max(e.rel_l2 for e in compare_models(model, result.model, feeds)) < 1.5


def test_convs_that_are_not_pointwise_are_declined_with_reason():
    for model, why in (
        (conv_net([64, 64, 8], kernel=3), "not a 1x1 kernel"),
        (conv_net([64, 64, 8], kernel=1, pads=0, strides=2), "stride 1"),
        (conv_net([64, 64, 8], kernel=1, pads=1), "padded"),
        (conv_net([64, 64, 8], kernel=1, pads=0, group=2), "group 1"),
    ):
        result, _ = _run(model, max_error=10.0, settings={"circulant": {"block": "64"}})
        conv0 = next(r for r in result.records if r.node == "conv0")
        assert conv0.status == "declined" and why in conv0.reason, conv0.as_dict()
