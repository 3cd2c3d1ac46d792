"""Numpy reference implementations of onnxopt's custom operators, one module per op.

Each module defines `SPEC` (an onnxopt.ops.OpSpec whose `reference` is the numpy function) and an
onnx.reference OpRun class named like the op, for `onnx.reference.ReferenceEvaluator(model, new_ops=...)`.
"""

from __future__ import annotations

from onnxopt.ops import OpSpec
from onnxopt.reference import acdc, binary, circulant, depthwise, fastfood, fftconv, lowbit, prune, winograd

SPECS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        winograd.SPEC,
        fftconv.SPEC,
        depthwise.SPEC,
        circulant.SPEC,
        fastfood.SPEC,
        acdc.SPEC,
        prune.GEMM_SPEC,
        prune.CONV_SPEC,
        lowbit.SPEC,
        lowbit.CONV_SPEC,
        binary.MATMUL_SPEC,
        binary.CONV_SPEC,
    )
}

# OpRun classes for onnx.reference.ReferenceEvaluator(model, new_ops=REFERENCE_OPS).
REFERENCE_OPS = [
    winograd.WinogradConv,
    fftconv.FFTConv,
    depthwise.DepthwiseConv,
    circulant.CirculantMatMul,
    fastfood.FastfoodMatMul,
    acdc.ACDCMatMul,
    prune.SparseGemm,
    prune.SparseConv,
    lowbit.LowBitMatMul,
    lowbit.LowBitConv,
    binary.BinaryMatMul,
    binary.BinaryConv,
]

__all__ = ["REFERENCE_OPS", "SPECS"]
