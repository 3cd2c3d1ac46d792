"""Accuracy budgets: the test an optimized model must pass against the original.

OutputBudget: for every model output, relative L2 error ||y' - y|| / ||y|| over the calibration inputs
at most `max_error` (default 1e-2).
MetricBudget: a task metric f(session) -> score (higher is better, as NNCF's validation function);
the optimized model may lose at most `max_drop` against the original's score.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime as ort

from onnxopt.data import Feeds
from onnxopt.errors import UserError
from onnxopt.library import session_for
from onnxopt.verify import compare_arrays, run_model


class Budget(ABC):
    """Decides whether an optimized model is acceptable."""

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def check(self, optimized: onnx.ModelProto) -> tuple[bool, dict]:
        """(within budget, measurements)."""

    @abstractmethod
    def summarise(self, measured: dict) -> str: ...

    @abstractmethod
    def baseline(self) -> dict:
        """Measurements of the original against itself (for an unchanged model)."""


class OutputBudget(Budget):
    """Relative L2 error of every output at most `max_error` on `feeds`."""

    def __init__(
        self, original: onnx.ModelProto, feeds: Feeds, max_error: float = 1e-2, threads: int | None = None
    ):
        if not max_error > 0:
            raise UserError(f"--max-error must be positive, got {max_error}")
        self.max_error = max_error
        self.feeds = feeds
        self.threads = threads
        self.reference = run_model(original, feeds, threads)

    def describe(self) -> str:
        return f"relative L2 error of every output <= {self.max_error:g}"

    def check(self, optimized: onnx.ModelProto) -> tuple[bool, dict]:
        got = run_model(optimized, self.feeds, self.threads)
        errors = [compare_arrays(n, self.reference[n], got[n]).as_dict() for n in self.reference]
        worst = max(e["rel_l2"] for e in errors)
        return worst <= self.max_error, {
            "kind": "output",
            "max_error": self.max_error,
            "outputs": errors,
            "worst_rel_l2": worst,
        }

    def summarise(self, measured: dict) -> str:
        return f"worst output relative L2 {measured['worst_rel_l2']:.3g} > {self.max_error:g}"

    def baseline(self) -> dict:
        outs = [{"name": n, "max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0} for n in self.reference]
        return {"kind": "output", "max_error": self.max_error, "outputs": outs, "worst_rel_l2": 0.0}


def load_metric(spec: str) -> Callable[[ort.InferenceSession], float]:
    """`MODULE:FUNCTION` or `path/to/file.py:FUNCTION` -> the callable.

    The current directory (and a file's own directory) go on sys.path so the metric can import its project.
    """
    where, _, func = spec.rpartition(":")
    if not where or not func:
        raise UserError(f"--eval {spec!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    search = [str(Path.cwd())]
    try:
        if where.endswith(".py"):
            path = Path(where).resolve()
            if not path.is_file():
                raise UserError(f"--eval: no such file {where}")
            search.append(str(path.parent))
            sys.path[:0] = [p for p in search if p not in sys.path]
            mod_spec = importlib.util.spec_from_file_location(f"onnxopt_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            sys.path[:0] = [p for p in search if p not in sys.path]
            module = importlib.import_module(where)
    except ImportError as e:
        raise UserError(f"--eval: cannot import {where}: {e}") from e
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UserError(f"--eval: {where} has no function {func!r}")
    return fn


class MetricBudget(Budget):
    """Task metric of the optimized model at most `max_drop` below the original's."""

    def __init__(
        self,
        original: onnx.ModelProto,
        metric: Callable,
        max_drop: float,
        threads: int | None = None,
        name: str = "metric",
    ):
        if max_drop < 0:
            raise UserError(f"--max-drop must be >= 0, got {max_drop}")
        self.metric, self.max_drop, self.threads, self.name = metric, max_drop, threads, name
        self.base = self._score(original)

    def _score(self, model: onnx.ModelProto) -> float:
        sess = session_for(model, threads=self.threads, verify=True)
        try:
            return float(self.metric(sess))
        except Exception as e:
            raise UserError(f"--eval {self.name} failed: {type(e).__name__}: {e}") from e

    def describe(self) -> str:
        return f"{self.name} at most {self.max_drop:g} below the original's {self.base:.4g}"

    def check(self, optimized: onnx.ModelProto) -> tuple[bool, dict]:
        score = self._score(optimized)
        drop = self.base - score
        return drop <= self.max_drop, {
            "kind": "metric",
            "metric": self.name,
            "original": self.base,
            "optimized": score,
            "drop": drop,
            "max_drop": self.max_drop,
        }

    def summarise(self, measured: dict) -> str:
        return f"{self.name} dropped {measured['drop']:.4g} > {self.max_drop:g}"

    def baseline(self) -> dict:
        return {
            "kind": "metric",
            "metric": self.name,
            "original": self.base,
            "optimized": self.base,
            "drop": 0.0,
            "max_drop": self.max_drop,
        }
