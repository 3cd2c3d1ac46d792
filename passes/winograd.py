"""winograd: Conv 3x3 (stride 1, dilation 1, group 1) -> WinogradConv custom op, F(2x2, 3x3) or F(4x4, 3x3).

Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A per a x a input tile d and t x t output tile (a = t + 2): F(2x2) makes 16
multiplications per (output channel, input channel, tile) instead of 36, 2.25x fewer; F(4x4) 36 instead of
144, 4x fewer, with about 10x the round-off. Exact up to fp32 round-off. The weights stay in the node as
OIHW; the kernel transforms them once when the session creates it. Both tile sizes are timed and the faster
is kept (F(4x4) wins on large images, F(2x2) where few tiles make the larger transformed weights dominate).
Speed-only: each layer is timed in onnxruntime against the Conv it replaces (onnxopt.timing) and the rewrite
is kept only where it is faster; not in the default set, since timing every layer takes a while.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxopt import DOMAIN
from onnxopt.analysis import FLOP_RULES
from onnxopt.passes.convolution import conv_params, conv_problem, explicit_pads
from onnxopt.rewrite import Decline, Option, Pass, PassContext, new_name, replace_node, weight_problem
from onnxopt.timing import keep_faster


class Winograd(Pass):
    name = "winograd"
    op_types = ("Conv",)
    lossy = False
    default = False
    measured = True
    summary = "Conv 3x3 stride 1 -> WinogradConv F(4x4) or F(2x2) custom op (exact; 4x/2.25x fewer products)"
    custom_ops = ("WinogradConv",)

    def check(self, node: gs.Node, ctx: PassContext) -> str | None:
        if problem := weight_problem(node):
            return problem
        shape = tuple(node.inputs[1].shape)
        if len(shape) != 4 or shape[2:] != (3, 3):
            return f"kernel shape {shape[2:]} is not 3x3 2-D"
        a = node.attrs
        if a.get("group", 1) != 1:
            return f"group={a['group']}: grouped convolution is not supported"
        if any(s != 1 for s in a.get("strides", [1, 1])):
            return f"strides={list(a['strides'])}: only stride 1 is supported"
        return conv_problem(node, ctx)

    def options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        M, C = node.inputs[1].shape[:2]  # OIHW; the kernel reads and transforms the weights itself
        pads = explicit_pads(node)
        params = conv_params(node)
        names = [t.name for t in node.inputs], [node.outputs[0].name]
        before = FLOP_RULES["Conv"](*names, {}, ctx.shapes)
        options = []
        for tile in self.tiles(ctx):
            flops = FLOP_RULES["WinogradConv"](*names, {"tile": tile}, ctx.shapes)
            if before and flops >= before:  # few channels: the transforms cost more than the products saved
                continue
            detail = {"tile": f"F({tile}x{tile},3x3)", "pads": pads}
            options.append(Option(0.0, params, 4 * params, flops, _emitter(pads, tile), detail))
        if not options:
            raise Decline(f"Winograd needs more FLOPs than direct convolution at {C}->{M} channels")
        return keep_faster(node, ctx, options)

    @staticmethod
    def tiles(ctx: PassContext) -> list[int]:
        """Output tile sizes to try: setting `tile` (2 or 4), or both."""
        tile = ctx.setting("tile", int)
        if tile is None:
            return [4, 2]
        if tile not in (2, 4):
            raise Decline(f"setting winograd.tile={tile}: only 2 and 4 are supported")
        return [tile]


def _emitter(pads: list[int], tile: int):
    def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
        new = gs.Node(
            "WinogradConv",
            new_name(prefix, "conv"),
            attrs={"pads": pads, "tile": tile},
            inputs=list(node.inputs),
            outputs=list(node.outputs),
            domain=DOMAIN,
        )
        return replace_node(graph, node, [new])

    return emit
