"""fftconv pass: which convolutions it takes, why it declines the others, and exactness of the result."""

from __future__ import annotations

import onnx
import pytest

from models.synthetic import conv_net
from onnxopt.budget import OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.manager import optimize
from onnxopt.passes.fftconv import FFTConv
from onnxopt.verify import compare_models
from tolerances import REL_L2_FFT


def _run(model, samples=2, measure=False):
    """Optimize with fftconv; by default without timing, so that every eligible layer is rewritten."""
    feeds = synthetic_inputs(model, samples=samples, seed=4)
    settings = {} if measure else {"fftconv": {"measure": "0"}}
    return optimize(model, [FFTConv()], feeds, OutputBudget(model, feeds, 1e-2), settings=settings), feeds


@pytest.mark.parametrize(
    "channels,size,kernel,pads,strides",
    [([3, 13, 15], 15, 5, 2, 1), ([3, 8], 13, 7, 3, 2), ([4, 8, 5], 16, 9, 4, 1)],
)
def test_convs_become_fftconv_and_stay_exact(channels, size, kernel, pads, strides):
    model = conv_net(channels, size=size, kernel=kernel, pads=pads, strides=strides)
    result, feeds = _run(model)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("FFTConv") == len(channels) - 1 and "Conv" not in ops
    assert all(n.domain == "onnxopt" for n in result.model.graph.node if n.op_type == "FFTConv")
    onnx.checker.check_model(result.model)
    err = max(e.rel_l2 for e in compare_models(model, result.model, feeds))
    assert err <= REL_L2_FFT, f"channels={channels} size={size} kernel={kernel} err={err}"
    rec = [r for r in result.records if r.status == "applied"]
    assert len(rec) == len(channels) - 1 and all(r.est_error == 0.0 and r.flops_after > 0 for r in rec)


@pytest.mark.parametrize(
    "kwargs,reason",
    [({"kernel": 3}, "too small"), ({"kernel": 5, "pads": 2, "group": 2}, "group")],
)
def test_unsupported_convs_declined_with_reason(kwargs, reason):
    model = conv_net([4, 8], size=10, **kwargs)
    result, _ = _run(model)
    assert not result.changed
    assert [r.status for r in result.records] == ["declined"]
    assert reason in result.records[0].reason


def test_dilated_conv_declined():
    model = conv_net([4, 8], size=12, kernel=5, pads=2)
    model.graph.node[0].attribute.append(onnx.helper.make_attribute("dilations", [2, 2]))
    result, _ = _run(model)
    assert "dilation" in result.records[0].reason


def test_not_in_default_set():
    from onnxopt.passes import default_methods

    assert "fftconv" not in default_methods()


def test_measured_layers_record_their_times_or_decline_as_slower():
    model = conv_net([3, 16, 8], size=24, kernel=7, pads=3)
    result, _ = _run(model, measure=True)
    assert len(result.records) == 2
    for r in result.records:
        if r.status == "applied":
            assert "ms_before" in r.detail and "ms_after" in r.detail and r.detail["threads"] == 1
        else:
            assert r.status == "declined" and r.reason.startswith("not faster:"), r.reason
