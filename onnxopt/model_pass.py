"""The contract of a model-level pass: a method that rewrites the whole model at once.

Some methods do not fit the per-node option flow of onnxopt.rewrite: quantization with onnxruntime's
quantizer calibrates and rewrites the whole graph in one call, and which layers it may touch is a choice
about the model, not about one node. A ModelPass runs after the per-node passes, on the model they produced
(so `--methods lowrank,int8` composes), and gets the same Budget object the pass manager verifies with: it
must return a model within that budget (or the model it was given, unchanged) and one Record per node it
looked at, saying what it did and why.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from onnxopt.budget import Budget
from onnxopt.data import Feeds
from onnxopt.rewrite import Record


@dataclass
class ModelContext:
    """What a model-level pass may read: calibration inputs, the budget, its settings."""

    feeds: Feeds
    budget: Budget
    settings: dict[str, str]
    # True when `feeds` are real data (--calib), False when they are synthetic: calibrating activation
    # ranges on random inputs would be worse than not calibrating.
    calibrated: bool = True
    threads: int = 1
    log: Callable[[str], None] = lambda s: None
    samples: list[Feeds] | None = None  # calibration samples of differing shapes, when the caller has them

    def setting(self, key: str, cast: Callable = str, default=None):
        """A user setting for this pass (`--set method.key=value`), cast, or `default`."""
        return cast(self.settings[key]) if key in self.settings else default


@dataclass
class ModelResult:
    """The model a model-level pass returns, its records, and the budget's measurement of it.

    `failure` says why every rewrite was undone (the budget could not be met at all), else None."""

    model: onnx.ModelProto
    records: list[Record]
    changed: bool
    verification: dict | None = None
    failure: str | None = None
    messages: list[str] = field(default_factory=list)


class ModelPass(ABC):
    """A compression method applied to the whole model; subclasses set the class attributes and `run`."""

    name: str = ""
    lossy: bool = True
    default: bool = False
    summary: str = ""
    custom_ops: tuple[str, ...] = ()

    @abstractmethod
    def run(self, model: onnx.ModelProto, ctx: ModelContext) -> ModelResult:
        """Rewrite `model` (never modified in place) within ctx.budget."""
