"""The pass manager: budget, rollback, unchanged models, records."""

from __future__ import annotations

import numpy as np
import pytest

from models.synthetic import conv_net, mlp
from onnxopt.budget import MetricBudget, OutputBudget
from onnxopt.data import synthetic_inputs
from onnxopt.errors import BudgetError
from onnxopt.manager import optimize
from onnxopt.passes import make_passes
from onnxopt.passes.lowrank import LowRank
from onnxopt.verify import compare_models


def test_nothing_to_rewrite_returns_model_unchanged():
    model = conv_net([3, 4], size=8)  # no Gemm/MatMul for lowrank
    feeds = synthetic_inputs(model, samples=2)
    result = optimize(model, [LowRank()], feeds, OutputBudget(model, feeds))
    assert not result.changed
    assert result.model.SerializeToString() == model.SerializeToString()
    assert any("nothing to rewrite" in m for m in result.messages)


def test_rollback_steps_back_until_within_budget():
    model = mlp([64, 128, 128, 10], decay=0.8, seed=3)
    feeds = synthetic_inputs(model, samples=32, seed=2)
    tight = 2e-3
    # Plan with a loose per-layer tolerance but verify against a tight budget: the manager must step back.
    budget = OutputBudget(model, feeds, tight)
    result = optimize(model, [LowRank()], feeds, budget, max_error=2e-2)
    assert result.changed
    assert max(e.rel_l2 for e in compare_models(model, result.model, feeds)) <= tight
    moved = [r for r in result.records if "stepped back" in r.reason or r.status == "undone"]
    assert moved, [r.as_dict() for r in result.records]


def test_budget_error_when_nothing_fits():
    model = mlp([64, 96, 10], decay=0.8)
    feeds = synthetic_inputs(model, samples=8)

    class Strict(OutputBudget):  # no rewrite ever fits
        def check(self, optimized):
            _, s = super().check(optimized)
            return False, {**s, "worst_rel_l2": 1.0}

    with pytest.raises(BudgetError, match="no rewrite fits"):
        optimize(model, [LowRank()], feeds, Strict(model, feeds, 1e-2))


def test_metric_budget_rolls_back_on_score_drop():
    model = mlp([32, 64, 4], decay=0.8, seed=5)
    feeds = synthetic_inputs(model, samples=64, seed=3)
    x = feeds["x"]

    def agreement(session) -> float:
        # Scores 100 only if the outputs equal the original's to 1e-4 relative: lowrank at 1e-2 cannot.
        y = session.run(None, {"x": x})[0]
        return 100.0 * float(np.linalg.norm(y - ref) <= 1e-4 * np.linalg.norm(ref))

    from onnxopt.verify import run_model

    ref = run_model(model, feeds)["y"]
    budget = MetricBudget(model, agreement, max_drop=0.5)
    with pytest.raises(BudgetError):
        optimize(model, [LowRank()], feeds, budget)


def test_records_cover_declined_nodes_with_reasons():
    model = conv_net([3, 8, 8], size=9, strides=2)
    feeds = synthetic_inputs(model, samples=2)
    result = optimize(model, make_passes(["winograd"]), feeds, OutputBudget(model, feeds))
    assert not result.changed
    assert all(r.status == "declined" and "stride" in r.reason for r in result.records)


def test_refine_steps_each_node_alone_and_keeps_what_fits(monkeypatch):
    """After the bisection every node sits at the same threshold; the greedy steps move the node whose next
    option saves most, alone, and keep it only if the whole model still passes."""
    import onnxopt.manager as manager
    from onnxopt.rewrite import Option, Record

    def option(nbytes):
        return Option(0.0, 0, nbytes, 0, emit=None)

    big = manager.Candidate(
        0, Record("m", "big", "Gemm", "applied", bytes_before=1000), [option(100), option(400)]
    )
    small = manager.Candidate(
        0, Record("m", "small", "Gemm", "applied", bytes_before=50), [option(10), option(30)]
    )
    big.choice = small.choice = 1
    monkeypatch.setattr(manager, "build", lambda original, passes, candidates: (big.choice, small.choice))

    class Budget:  # the model passes unless the small node takes its most compressive option
        def check(self, model):
            return model[1] == 1, {"choices": model}

    model, summary = manager._refine(None, [], [big, small], Budget(), "start", {}, lambda s: None)
    assert (big.choice, small.choice) == (0, 1)
    assert model == (0, 1) and summary == {"choices": (0, 1)}


def test_refine_breaks_byte_ties_by_flops_saved(monkeypatch):
    """Options of one size (binary's activation widths): the greedy step goes to the node whose next option
    saves the most FLOPs, and a budget that allows one step keeps exactly that one."""
    import onnxopt.manager as manager
    from onnxopt.rewrite import Option, Record

    def option(flops):
        return Option(0.0, 0, 100, flops, emit=None)

    few = manager.Candidate(0, Record("m", "few", "Gemm", "applied"), [option(900), option(1000)])
    many = manager.Candidate(0, Record("m", "many", "Gemm", "applied"), [option(100), option(1000)])
    few.choice = many.choice = 1
    monkeypatch.setattr(manager, "build", lambda original, passes, candidates: (few.choice, many.choice))

    class Budget:  # one node may step, not both
        def check(self, model):
            return sum(model) >= 1, {"choices": model}

    model, _ = manager._refine(None, [], [few, many], Budget(), (1, 1), {}, lambda s: None)
    assert model == (1, 0), model


def test_when_no_threshold_passes_single_rewrites_are_still_tried(monkeypatch):
    """A layer whose estimate is far too low fails every threshold of the bisection (its least lossy option
    has the smallest estimate); the greedy steps from 'all undone' still keep the other layer's rewrite."""
    import onnxopt.manager as manager
    from onnxopt.rewrite import Option, Record

    def option(err, nbytes):
        return Option(err, 0, nbytes, 0, emit=None)

    liar = manager.Candidate(0, Record("m", "liar", "Gemm", "applied", bytes_before=100), [option(1e-4, 50)])
    good = manager.Candidate(
        0, Record("m", "good", "Gemm", "applied", bytes_before=1000), [option(0.05, 100), option(0.01, 300)]
    )
    monkeypatch.setattr(manager, "build", lambda original, passes, candidates: (liar.choice, good.choice))

    class Budget:  # any model with the liar's rewrite is over budget; the good node's options all pass
        def check(self, model):
            return model[0] != 0, {"choices": model}

        def summarise(self, measured):
            return f"choices {measured['choices']}"

    model, summary, failures = manager._fit_budget(None, [], [liar, good], Budget(), False, lambda s: None)
    assert (liar.choice, good.choice) == (1, 0)
    assert model == (1, 0) and summary == {"choices": (1, 0)} and failures


def test_energy_aware_threshold_spends_the_budget_where_it_saves_most_time(monkeypatch):
    """With measured savings on every option, tau bounds error per millisecond saved: of two layers with the
    same errors, the one whose rewrite saves 10x the time keeps its most compressive option, the other steps
    back; and the greedy steps try the larger time saving first."""
    import onnxopt.manager as manager
    from onnxopt.rewrite import Option, Record

    def option(err, ms, nbytes=0):
        return Option(err, 0, nbytes, 0, emit=None, ms_saved=ms)

    fast = manager.Candidate(0, Record("m", "fast", "Gemm", "applied"), [option(0.2, 10.0), option(0.1, 6.0)])
    slow = manager.Candidate(0, Record("m", "slow", "Gemm", "applied"), [option(0.2, 1.0), option(0.1, 0.6)])
    assert manager._energy_aware([fast, slow])
    manager._choose([fast, slow], 0.02)  # error/ms: fast 0.02, 0.0167; slow 0.2, 0.167
    assert (fast.choice, slow.choice) == (0, 2)
    manager._choose([fast, slow], 0.17)
    assert (fast.choice, slow.choice) == (0, 1)
    fast.choice = slow.choice = 1
    assert manager._next_time_saving(fast) == 4.0 and manager._next_time_saving(slow) == pytest.approx(0.4)
    plain = manager.Candidate(0, Record("m", "plain", "Gemm", "applied"), [Option(0.1, 0, 0, 0, emit=None)])
    assert not manager._energy_aware([fast, plain])  # one candidate without timings: errors alone
    manager._choose([fast, plain], 0.15)
    assert (fast.choice, plain.choice) == (1, 0)
