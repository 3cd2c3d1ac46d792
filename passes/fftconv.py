"""fftconv: Conv with a large or long kernel (group 1, dilation 1) -> FFTConv custom op.

Convolution theorem per overlap-save tile: Y_m = IFFT( sum_c conj(FFT(w_{m,c})) . FFT(x_c) ), strides by a
polyphase split into C sh sw stride-1 channels. Per output the cost grows with log(tile) instead of with the
kernel's kh kw taps, so it pays for 2-D kernels of 5x5 and up and for long 1-D kernels (audio, pitch models).
Exact up to fp32 round-off. The weights stay in the node as OIHW; the kernel computes their spectra itself.
Speed-only: each layer is timed in onnxruntime against the Conv it replaces (onnxopt.timing) and the rewrite
is kept only where it is faster; not in the default set, since timing every layer takes a while.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxopt import DOMAIN
from onnxopt.analysis import FLOP_RULES
from onnxopt.passes.convolution import conv_params, conv_problem, explicit_pads
from onnxopt.rewrite import Option, Pass, PassContext, new_name, replace_node, weight_problem
from onnxopt.timing import keep_faster

MIN_TAPS_2D = 25  # 5x5: below it direct convolution (im2col + GEMM) is hard to beat
MIN_TAPS_1D = 16  # a 1-D kernel (kh or kw = 1) this long


class FFTConv(Pass):
    name = "fftconv"
    op_types = ("Conv",)
    lossy = False
    default = False
    measured = True
    summary = "Conv with kernels >= 5x5 or 1-D >= 16 taps -> FFTConv custom op (exact; FFT per tile)"
    custom_ops = ("FFTConv",)

    def check(self, node: gs.Node, ctx: PassContext) -> str | None:
        if problem := weight_problem(node):
            return problem
        shape = tuple(node.inputs[1].shape)
        if len(shape) != 4:
            return f"weight has rank {len(shape)}, not a 2-D convolution"
        kh, kw = shape[2:]
        long_1d = min(kh, kw) == 1 and max(kh, kw) >= MIN_TAPS_1D
        if kh * kw < MIN_TAPS_2D and not long_1d:
            return (
                f"kernel {kh}x{kw} is too small for FFTs "
                f"(needs kh*kw >= {MIN_TAPS_2D} or 1-D >= {MIN_TAPS_1D} taps)"
            )
        if node.attrs.get("group", 1) != 1:
            return f"group={node.attrs['group']}: grouped convolution is not supported"
        return conv_problem(node, ctx)

    def options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        pads = explicit_pads(node)
        strides = list(node.attrs.get("strides", [1, 1]))
        params = conv_params(node)
        names = ([t.name for t in node.inputs], [node.outputs[0].name])
        flops = FLOP_RULES["FFTConv"](*names, {"strides": strides}, ctx.shapes)

        def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
            new = gs.Node(
                "FFTConv",
                new_name(prefix, "conv"),
                attrs={"pads": pads, "strides": strides},
                inputs=list(node.inputs),
                outputs=list(node.outputs),
                domain=DOMAIN,
            )
            return replace_node(graph, node, [new])

        option = Option(0.0, params, 4 * params, flops, emit, {"pads": pads, "strides": strides})
        return keep_faster(node, ctx, [option])
