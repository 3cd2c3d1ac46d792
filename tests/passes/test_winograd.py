"""winograd pass: which convolutions it takes, why it declines the others, and exactness of the result."""

from __future__ import annotations

import onnx
import pytest

from models.synthetic import conv_net
from onnxopt.budget import OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.manager import optimize
from onnxopt.passes.winograd import Winograd
from onnxopt.verify import compare_models
from tolerances import REL_L2, WINOGRAD_F4, tol


def _run(model, samples=3, measure=False, **extra):
    """Optimize with winograd; by default without timing, so that every eligible layer is rewritten."""
    feeds = synthetic_inputs(model, samples=samples, seed=4)
    settings = {"winograd": {**({} if measure else {"measure": "0"}), **extra}}
    return optimize(model, [Winograd()], feeds, OutputBudget(model, feeds, 1e-2), settings=settings), feeds


@pytest.mark.parametrize("channels,size,pads", [([3, 13, 15], 9, 1), ([15, 16], 7, 0), ([4, 8, 8, 5], 12, 2)])
def test_convs_become_winograd_and_stay_exact(channels, size, pads):
    model = conv_net(channels, size=size, pads=pads)
    result, feeds = _run(model)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("WinogradConv") == len(channels) - 1 and "Conv" not in ops
    assert all(n.domain == "onnxopt" for n in result.model.graph.node if n.op_type == "WinogradConv")
    onnx.checker.check_model(result.model)
    err = max(e.rel_l2 for e in compare_models(model, result.model, feeds))
    assert err <= tol("float32", REL_L2), f"channels={channels} size={size} pads={pads} err={err}"
    rec = [r for r in result.records if r.status == "applied"]
    assert all(r.flops_after < r.flops_before and r.est_error == 0.0 for r in rec)


@pytest.mark.parametrize(
    "kwargs,reason",
    [({"strides": 2}, "stride"), ({"group": 2}, "group"), ({"kernel": 5, "pads": 2}, "3x3")],
)
def test_unsupported_convs_declined_with_reason(kwargs, reason):
    model = conv_net([4, 8], size=10, **kwargs)
    result, _ = _run(model)
    assert not result.changed
    assert [r.status for r in result.records] == ["declined"]
    assert reason in result.records[0].reason


def test_dilated_conv_declined():
    model = conv_net([4, 8], size=10)
    model.graph.node[0].attribute.append(onnx.helper.make_attribute("dilations", [2, 2]))
    result, _ = _run(model)
    assert "dilation" in result.records[0].reason


def test_not_in_default_set():
    from onnxopt.passes import default_methods

    assert "winograd" not in default_methods() and "lowrank" in default_methods()


def test_measured_layers_record_their_times_or_decline_as_slower():
    model = conv_net([8, 16, 16], size=12, pads=1)
    result, _ = _run(model, measure=True)
    assert len(result.records) == 2
    for r in result.records:
        if r.status == "applied":
            assert r.detail["ms_before"] / r.detail["ms_after"] >= 1.05 and r.detail["threads"] == 1
        else:
            assert r.status in ("declined", "undone"), r
            assert r.reason.startswith(("not faster:", "undone: the whole model")), r.reason


@pytest.mark.parametrize("tile", ["2", "4"])
def test_tile_setting_picks_the_variant(tile):
    model = conv_net([8, 16], size=12, pads=1)
    result, feeds = _run(model, tile=tile)
    (node,) = [n for n in result.model.graph.node if n.op_type == "WinogradConv"]
    assert onnx.helper.get_attribute_value(
        node.attribute[[a.name for a in node.attribute].index("tile")]
    ) == int(tile)
    assert result.records[0].detail["tile"] == f"F({tile}x{tile},3x3)"
    err = max(e.rel_l2 for e in compare_models(model, result.model, feeds))
    assert err <= tol("float32", WINOGRAD_F4), f"tile={tile}: err={err}"


def test_without_measurement_the_larger_tile_comes_first():
    result, _ = _run(conv_net([8, 16], size=12, pads=1))
    assert result.records[0].detail["tile"] == "F(4x4,3x3)"


def test_bad_tile_setting_declines_with_reason():
    result, _ = _run(conv_net([8, 16], size=12, pads=1), tile="3")
    assert result.records[0].status == "declined" and "winograd.tile=3" in result.records[0].reason
