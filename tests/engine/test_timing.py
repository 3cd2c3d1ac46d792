"""Speed-only rewrites: kept per layer only when timed faster, and undone together when the whole model is
not faster. The clocks are replaced by fixed figures here (speed itself belongs to benchmarks): these tests
check the decisions taken on given timings, and that a real timing run records its figures."""

from __future__ import annotations

import pytest

import onnxopt.bench
import onnxopt.timing
from models.synthetic import conv_net
from onnxopt.budget import OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.manager import optimize
from onnxopt.passes.winograd import Winograd


def _optimize(model, **settings):
    feeds = synthetic_inputs(model, samples=2, seed=1)
    return optimize(model, [Winograd()], feeds, OutputBudget(model, feeds), settings={"winograd": settings})


def _fixed_layer_times(monkeypatch, times):
    """Every layer timing returns `times` (original first, then the options F(4x4), F(2x2))."""
    monkeypatch.setattr(onnxopt.timing, "median_times", lambda models, threads, rounds=0: list(times))


def _fixed_model_times(monkeypatch, before, after):
    def latency(models, feeds, threads=1, rounds=0, **kw):
        return [{"median_ms": before}, {"median_ms": after}]

    monkeypatch.setattr(onnxopt.bench, "latency", latency)


def test_fastest_option_kept_and_times_recorded(monkeypatch):
    _fixed_layer_times(monkeypatch, [2.0, 1.6, 1.0])  # F(2x2) fastest
    _fixed_model_times(monkeypatch, 5.0, 4.0)
    result = _optimize(conv_net([8, 16, 16], size=12))
    assert result.changed
    for r in result.records:
        assert r.status == "applied" and r.detail["tile"] == "F(2x2,3x3)", r
        assert (r.detail["ms_before"], r.detail["ms_after"], r.detail["speedup"]) == (2.0, 1.0, 2.0)


def test_layer_not_faster_is_declined_with_its_times(monkeypatch):
    _fixed_layer_times(monkeypatch, [1.0, 1.2, 0.99])  # F(2x2) 1% faster: within the noise margin
    result = _optimize(conv_net([8, 16], size=12))
    assert not result.changed
    (r,) = result.records
    assert r.status == "declined" and r.reason.startswith("not faster: 1.000 ms"), r.reason


def test_whole_model_slower_undoes_the_speed_rewrites(monkeypatch):
    _fixed_layer_times(monkeypatch, [2.0, 1.0, 1.5])
    _fixed_model_times(monkeypatch, 4.0, 4.5)
    model = conv_net([8, 16, 16], size=12)
    result = _optimize(model)
    assert not result.changed and result.model is model
    assert all(r.status == "undone" and "whole model ran 4.500 ms" in r.reason for r in result.records)


def test_measure_off_keeps_every_rewrite_untimed(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("timed although measure=0")

    monkeypatch.setattr(onnxopt.timing, "median_times", fail)
    monkeypatch.setattr(onnxopt.bench, "latency", fail)
    result = _optimize(conv_net([8, 16, 16], size=12), measure="0")
    assert result.changed and all(r.detail["measured"] == "no (measure=0)" for r in result.records)


@pytest.mark.parametrize("threads", [1, 2])
def test_real_timing_records_figures_or_says_not_faster(threads):
    model = conv_net([8, 16], size=12)
    feeds = synthetic_inputs(model, samples=2, seed=1)
    result = optimize(model, [Winograd()], feeds, OutputBudget(model, feeds), threads=threads)
    (r,) = result.records
    if r.status == "applied":
        assert r.detail["threads"] == threads and r.detail["ms_before"] >= 1.05 * r.detail["ms_after"]
    else:
        assert r.reason.startswith(("not faster:", "undone: the whole model")), r.reason


def test_session_times_rejects_an_unknown_statistic():
    with pytest.raises(ValueError, match="median or min"):
        onnxopt.timing.session_times([object()], rounds=1, stat="mean")
