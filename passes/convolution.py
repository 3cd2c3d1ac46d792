"""What the convolution passes (winograd, fftconv, depthwise) share: the checks every Conv rewrite needs and
the attributes every emitted node takes.

A Conv is rewritable by these exact methods only when its output is the plain cross-correlation
Y[n, m] = B[m] + sum_c W[m, c] * Xp[n, c] over the explicitly padded input Xp: constant bias, dilation 1,
explicit pads (auto_pad NOTSET, or VALID meaning none), and a 4-D input.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxopt.rewrite import PassContext


def conv_problem(node: gs.Node, ctx: PassContext) -> str | None:
    """Why `node` is not a plain 2-D Conv with constant bias, dilation 1 and explicit pads; None if it is."""
    if has_bias(node) and not isinstance(node.inputs[2], gs.Constant):
        return "bias is not constant"
    a = node.attrs
    if any(d != 1 for d in a.get("dilations", [1, 1])):
        return f"dilations={list(a['dilations'])}: only dilation 1 is supported"
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"auto_pad={a['auto_pad']} is not supported (explicit pads only)"
    x = ctx.shapes.get(node.inputs[0].name)
    if x is not None and len(x) != 4:
        return f"input has rank {len(x)}, not 4"
    return None


def has_bias(node: gs.Node) -> bool:
    return len(node.inputs) > 2 and bool(node.inputs[2].name)


def explicit_pads(node: gs.Node) -> list[int]:
    """[top, left, bottom, right] of a Conv whose auto_pad is NOTSET or VALID."""
    if node.attrs.get("auto_pad", "NOTSET") == "VALID":
        return [0, 0, 0, 0]
    return [int(p) for p in node.attrs.get("pads", [0, 0, 0, 0])]


def conv_params(node: gs.Node) -> int:
    """Elements of the weight and the bias."""
    weight = 1
    for d in node.inputs[1].shape:
        weight *= int(d)
    return weight + (int(node.inputs[1].shape[0]) if has_bias(node) else 0)
