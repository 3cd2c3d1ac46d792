"""The compression methods, one module per family; installed as `onnxopt.passes`.

METHODS maps each method name (the name used by the pass, its kernel, its reference and its tests) to its
pass class, in the order the pass manager runs them (model-level passes such as int8 run after every per-node
pass, see onnxopt.model_pass; filter_prune runs first, as its rewrites reshape its candidates' consumers).
"""

from __future__ import annotations

from onnxopt.errors import UserError
from onnxopt.model_pass import ModelPass
from onnxopt.passes.acdc import ACDC
from onnxopt.passes.binary import Binary
from onnxopt.passes.circulant import Circulant
from onnxopt.passes.depthwise import Depthwise
from onnxopt.passes.fastfood import Fastfood
from onnxopt.passes.fftconv import FFTConv
from onnxopt.passes.filter_prune import FilterPrune
from onnxopt.passes.int8 import Int8
from onnxopt.passes.lowbit import LowBit
from onnxopt.passes.lowrank import LowRank
from onnxopt.passes.prune import Prune
from onnxopt.passes.sparse_basis import SparseBasis
from onnxopt.passes.tensor_train import TensorTrain
from onnxopt.passes.winograd import Winograd
from onnxopt.rewrite import Pass

METHODS: dict[str, type[Pass] | type[ModelPass]] = {
    cls.name: cls
    for cls in (
        FilterPrune,  # first: its rewrites reshape the consumers of the Convs it prunes
        LowRank,
        Winograd,
        FFTConv,
        Depthwise,
        Circulant,
        Fastfood,
        ACDC,
        TensorTrain,
        Prune,
        SparseBasis,
        LowBit,
        Binary,
        Int8,
    )
}


def default_methods() -> list[str]:
    """Methods run when the user names none: those that pay off without a speed measurement."""
    return [name for name, cls in METHODS.items() if cls.default]


def make_passes(names: list[str] | None) -> list[Pass | ModelPass]:
    """Pass instances for method names (None: the default set), in METHODS order."""
    chosen = default_methods() if not names else names
    unknown = [n for n in chosen if n not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    return [cls() for name, cls in METHODS.items() if name in chosen]
