"""Numpy reference of DepthwiseConv: a 3x3 depthwise convolution (one filter per channel), stride 1 or 2,
with an optional fused Relu or Clip.

With Xp the input zero-padded by pads = [top, left, bottom, right] and s the stride,

    OH = (H + top + bottom - 3) // s + 1,        OW = (W + left + right - 3) // s + 1
    Y[n, c, y, x] = act( B[c] + sum_{i=0..2} sum_{j=0..2} W[c, 0, i, j] * Xp[n, c, s*y + i, s*x + j] )

    act(v) = v                          activation ""
           = max(v, 0)                  activation "relu"
           = min(max(v, clip_min), clip_max)   activation "clip" (ReLU6: clip_min 0, clip_max 6)

This is ONNX Conv(X, W, B, group=C, kernel_shape=[3, 3], pads, strides=[s, s]) followed by Relu or Clip:
every channel is convolved with its own 3x3 filter and channels never mix, so a plane costs 9 multiply-adds
per output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx.reference.op_run import OpRun

from onnxopt.ops import OpSpec

ACTIVATIONS = ("", "relu", "clip")


def output_size(size: int, pad_before: int, pad_after: int, stride: int) -> int:
    """Output length along one axis for a 3-tap filter: (size + pads - 3) // stride + 1, or 0 when empty."""
    span = size + pad_before + pad_after - 3
    return span // stride + 1 if span >= 0 else 0


def _check(
    X: np.ndarray, W: np.ndarray, B: np.ndarray | None, pads: Sequence[int], strides: Sequence[int], act: str
) -> tuple[tuple[int, ...], int]:
    if X.ndim != 4:
        raise ValueError(f"X must have rank 4 [N, C, H, W], got shape {list(X.shape)}")
    if W.ndim != 4 or W.shape[1:] != (1, 3, 3) or W.shape[0] < 1:
        raise ValueError(f"W must have shape [C, 1, 3, 3] with C >= 1, got {list(W.shape)}")
    if X.shape[1] != W.shape[0]:
        raise ValueError(f"X has {X.shape[1]} channels (shape {list(X.shape)}) but W has C = {W.shape[0]}")
    if B is not None and B.shape != (W.shape[0],):
        raise ValueError(f"B must have shape [{W.shape[0]}], got {list(B.shape)}")
    pads = tuple(int(p) for p in pads)
    if len(pads) != 4 or min(pads) < 0:
        raise ValueError(f"pads must be 4 non-negative ints [top, left, bottom, right], got {list(pads)}")
    strides = [int(s) for s in strides]
    if len(strides) != 2 or strides[0] != strides[1] or strides[0] not in (1, 2):
        raise ValueError(f"strides must be [1, 1] or [2, 2], got {strides}")
    if act not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {act!r}")
    return pads, strides[0]


def apply_activation(Y: np.ndarray, activation: str, clip_min: float, clip_max: float) -> np.ndarray:
    """act(Y) as in the module docstring (Clip's order: the lower bound first, then the upper)."""
    if activation == "relu":
        return np.maximum(Y, 0)
    if activation == "clip":
        return np.minimum(np.maximum(Y, clip_min), clip_max)
    return Y


def depthwise_conv(
    X: np.ndarray,
    W: np.ndarray,
    B: np.ndarray | None = None,
    pads: Sequence[int] = (0, 0, 0, 0),
    strides: Sequence[int] = (1, 1),
    activation: str = "",
    clip_min: float = -np.inf,
    clip_max: float = np.inf,
) -> np.ndarray:
    """Y = act(depthwise Conv(X, W, B)) for 3x3 filters; X [N, C, H, W], W [C, 1, 3, 3], B [C] or None.

    Returns Y [N, C, OH, OW] in X's dtype (arithmetic in float64); see the module docstring.
    """
    X, W = np.asarray(X), np.asarray(W)
    B = None if B is None else np.asarray(B)
    (top, left, bottom, right), s = _check(X, W, B, pads, strides, activation)
    N, C, H, Wd = X.shape
    OH, OW = output_size(H, top, bottom, s), output_size(Wd, left, right, s)
    if OH <= 0 or OW <= 0:
        raise ValueError(f"output would be empty: X spatial {H}x{Wd} with pads {list(pads)} gives {OH}x{OW}")
    Xp = np.pad(X.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    Y = np.zeros((N, C, OH, OW), dtype=np.float64)
    w = W.astype(np.float64)[:, 0]  # [C, 3, 3]
    for i in range(3):
        for j in range(3):
            tap = Xp[:, :, i : i + s * (OH - 1) + 1 : s, j : j + s * (OW - 1) + 1 : s]
            Y += w[None, :, i, j, None, None] * tap
    if B is not None:
        Y += B.astype(np.float64)[None, :, None, None]
    Y = apply_activation(Y, activation, clip_min, clip_max)
    return np.ascontiguousarray(Y, dtype=X.dtype)


class DepthwiseConv(OpRun):
    """DepthwiseConv for onnx.reference.ReferenceEvaluator(model, new_ops=[DepthwiseConv])."""

    op_domain = "onnxopt"

    def _run(
        self,
        X,
        W,
        B=None,
        pads=None,
        strides=None,
        activation=None,
        clip_min=None,
        clip_max=None,
        group=None,
        dilations=None,
        kernel_shape=None,
    ):
        if group is not None and group != W.shape[0]:
            raise ValueError(f"group must equal C = {W.shape[0]}, got {group}")
        act = activation.decode() if isinstance(activation, bytes) else (activation or "")
        return (
            depthwise_conv(
                X,
                W,
                B,
                (0, 0, 0, 0) if pads is None else pads,
                (1, 1) if strides is None else strides,
                act,
                -np.inf if clip_min is None else clip_min,
                np.inf if clip_max is None else clip_max,
            ),
        )


SPEC = OpSpec(
    name="DepthwiseConv",
    summary="3x3 depthwise convolution, stride 1 or 2, optional fused Relu/Clip; equals ONNX Conv group=C",
    inputs=[
        ("X", "float32 [N, C, H, W]; input"),
        (
            "W",
            "float32 [C, 1, 3, 3]; one filter per channel, a constant initializer (copied once)",
        ),
        ("B", "float32 [C], optional; bias, a constant initializer"),
    ],
    outputs=[("Y", "float32 [N, C, (H + top + bottom - 3) / s + 1, (W + left + right - 3) / s + 1]")],
    attributes=[
        ("pads", "ints [top, left, bottom, right] (ONNX Conv order), non-negative; default [0, 0, 0, 0]"),
        ("strides", "ints [s, s] with s in {1, 2}; default [1, 1]"),
        ("activation", 'string "" (none), "relu" or "clip"; default ""'),
        ("clip_min, clip_max", 'floats, only with activation "clip"; default -inf / +inf'),
        ("group", "int, optional; must equal C"),
        ("dilations, kernel_shape", "ints, optional; only all-ones and [3, 3] are accepted"),
    ],
    constraints=[
        "kernel 3x3, dilation 1, stride 1 or 2 (equal on both axes), group = C",
        "X's channel count equals W's C; B has C elements",
        "W and B are constant initializers (error at session creation otherwise)",
        "the output is non-empty: H + top + bottom >= 3 and W + left + right >= 3",
    ],
    formula="""
Xp = X zero-padded by pads;  s = stride
Y[n, c, y, x] = act(B[c] + sum_{i,j<3} W[c, 0, i, j] Xp[n, c, s y + i, s x + j])
act = identity | max(v, 0) | min(max(v, clip_min), clip_max)
""",
    reference=depthwise_conv,
)

__all__ = ["SPEC", "DepthwiseConv", "apply_activation", "depthwise_conv", "output_size"]
