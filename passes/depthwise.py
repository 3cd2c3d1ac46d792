"""depthwise: Conv 3x3 with group = C (one filter per channel, stride 1 or 2) -> DepthwiseConv custom op.

Y[n, c, y, x] = act(B[c] + sum_{i,j<3} W[c, 0, i, j] Xp[n, c, s y + i, s x + j]): the same arithmetic as the
Conv, 9 multiply-adds per output, so the rewrite is exact up to fp32 round-off and saves no FLOPs. What it
saves is time: onnxruntime runs depthwise convolutions far below the machine's peak, DepthwiseConv streams
each plane once with the padding handled in registers. A following Relu or Clip (ReLU6) is fused into the
node when the Conv's output feeds nothing else, as onnxruntime fuses it into its own Conv.
Speed-only: each layer is timed in onnxruntime against the Conv it replaces (onnxopt.timing) and the rewrite
is kept only where it is faster; not in the default set, since timing every layer takes a while.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import DOMAIN
from onnxopt.analysis import FLOP_RULES
from onnxopt.passes.convolution import conv_params, conv_problem, explicit_pads
from onnxopt.rewrite import Option, Pass, PassContext, constant_value, new_name, replace_node, weight_problem
from onnxopt.timing import keep_faster


def fusable_activation(graph: gs.Graph, node: gs.Node, ctx: PassContext) -> tuple[gs.Node, dict] | None:
    """The Relu or Clip that alone reads `node`'s output (which is no graph output), with the DepthwiseConv
    attributes that compute it; None when there is none or it cannot be fused (Clip with variable bounds)."""
    out = node.outputs[0]
    if ctx.consumers.get(out.name, 0) != 1 or any(t.name == out.name for t in graph.outputs):
        return None
    if len(out.outputs) != 1:
        return None
    act = out.outputs[0]
    if act.op == "Relu":
        return act, {"activation": "relu"}
    if act.op == "Clip" and (bounds := clip_bounds(act)) is not None:
        return act, {"activation": "clip", **bounds}
    return None


def clip_bounds(clip: gs.Node) -> dict[str, float] | None:
    """clip_min / clip_max of a Clip node (inputs since opset 11, attributes before); a bound that is absent
    is left out (the kernel's default is unbounded). None when a bound is not a constant scalar."""
    bounds: dict[str, float] = {}
    for index, key, attr in ((1, "clip_min", "min"), (2, "clip_max", "max")):
        if attr in clip.attrs:
            bounds[key] = float(clip.attrs[attr])
        if len(clip.inputs) > index and clip.inputs[index].name:
            t = clip.inputs[index]
            if not isinstance(t, gs.Constant) or int(np.prod(t.shape)) != 1:
                return None
            bounds[key] = float(np.asarray(constant_value(t), dtype=np.float32).reshape(()))
    return bounds


class Depthwise(Pass):
    name = "depthwise"
    op_types = ("Conv",)
    lossy = False
    default = False
    measured = True
    summary = "Conv 3x3 group=C stride 1/2 (+Relu/Clip) -> DepthwiseConv custom op (exact; faster than ORT's)"
    custom_ops = ("DepthwiseConv",)

    def check(self, node: gs.Node, ctx: PassContext) -> str | None:
        if problem := weight_problem(node):
            return problem
        shape = tuple(node.inputs[1].shape)
        if len(shape) != 4 or shape[2:] != (3, 3):
            return f"kernel shape {shape[2:]} is not 3x3 2-D"
        a = node.attrs
        C, group = shape[0], a.get("group", 1)
        if group != C or shape[1] != 1:
            return f"group={group} with weight {list(shape)}: not depthwise (needs group = C, W [C, 1, 3, 3])"
        x = ctx.shapes.get(node.inputs[0].name)
        if x is not None and (len(x) != 4 or x[1] != C):
            return f"input shape {list(x)} is not [N, {C}, H, W]"
        strides = list(a.get("strides", [1, 1]))
        if len(set(strides)) != 1 or strides[0] not in (1, 2):
            return f"strides={strides}: only stride 1 or 2, equal on both axes, is supported"
        return conv_problem(node, ctx)

    def options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        C = node.inputs[1].shape[0]
        stride = int(node.attrs.get("strides", [1, 1])[0])
        pads = explicit_pads(node)
        params = conv_params(node)
        names = [t.name for t in node.inputs], [node.outputs[0].name]
        flops = FLOP_RULES["DepthwiseConv"](*names, {}, ctx.shapes)
        attrs = {"pads": pads, "strides": [stride, stride], "group": C}

        def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
            outputs, extra = list(node.outputs), {}
            if (fused := fusable_activation(graph, node, ctx)) is not None:
                act, extra = fused
                outputs = list(act.outputs)
                act.inputs.clear()  # the activation is now inside the new node; cleanup drops it
                act.outputs.clear()
            new = gs.Node(
                "DepthwiseConv",
                new_name(prefix, "conv"),
                attrs={**attrs, **extra},
                inputs=list(node.inputs),
                outputs=outputs,
                domain=DOMAIN,
            )
            return replace_node(graph, node, [new])

        fused = fusable_activation(ctx.graph, node, ctx)
        detail = {"stride": stride, "pads": pads, "fused": fused[1]["activation"] if fused else ""}
        option = Option(0.0, params, 4 * params, flops, emit, detail)
        return keep_faster(node, ctx, [option])
