"""lowbit: a Gemm or MatMul with a constant float32 weight W (K x N, y = x W + b) becomes a LowBitMatMul whose
weight is stored as group-wise 2-, 3- or 4-bit codes (weight-only quantization; op semantics and code layout
in onnxopt.reference.lowbit, kernel in custom_ops/lowbit.cc). A Conv (group 1, constant weight
A [M, C, kh, kw], any kernel size, strides, pads and dilations; explicit pads) becomes a LowBitConv: the same
codes of its im2col form W = A reshaped to M x (C kh kw), transposed (K = C kh kw, N = M; each filter's
groups run along its C kh kw reduction axis), with calibration rows X its input patches (up to 8192, seeded,
as prune takes them; GPTQ's H = X^T X from half of them) (custom_ops/lowbit_conv.cc).

`lowbit.layers=all|fc|conv` selects the layer kinds (default all). LowBitMatMul's int8-activation mode
(`act_bits=8`: each input row quantized to int8 at run time, integer dot products; 4-bit codes only) has its
estimated error measured through the op's reference on the held-out rows, so it includes the activation
rounding. `lowbit.act_bits=auto` (default, Gemm/MatMul with calibration rows): every 4-bit option is offered
twice, int8 inputs first (faster) and float inputs second, and the budget takes the int8 form wherever its
error fits; `0` offers float inputs only, `8` int8 inputs only (other bit widths are then not offered).

Options: bits in (2, 3, 4) x group size G in (128, 64, 32) (`--set lowbit.bits=4`, `lowbit.group_size=64` fix
one), most compressive first by stored bytes: bits / 8 per weight plus 5 bytes per group (float32 scale, uint8
zero point). K is padded to a multiple of G by the kernel (the padded codes meet zero inputs).

Roundings (passes/lowbit_quantize.py): round-to-nearest (RTN) and GPTQ, which quantizes the rows of W in order
and pushes each row's rounding error onto the later rows through the Cholesky factor of the inverse of
H = X^T X + damping, X the layer's calibration inputs. `--set lowbit.rounding=rtn|gptq|auto` (auto, the
default: both, and the one with the lower estimated error is kept; RTN only without calibration data).

Estimated error: ||X W - X W~||_F / ||X W + b||_F on held-out calibration rows (every other row; GPTQ's H is
built from the others), as lowrank does; without calibration data, ||W - W~||_F / ||W||_F.

Speed (`lowbit.measure`, default 1): every option is timed as a one-layer model against the original layer
in onnxruntime at the target threads and batch (`lowbit.batch`, default 1; onnxopt.timing), and only the
options at least MIN_GAIN (1.05x) faster are kept (the node is declined with the times otherwise); the pass
manager then times the whole model and undoes the rewrites if it is not faster. `lowbit.measure=0` skips
both and keeps every option the budget allows: lowbit as a size method (codes are bits/8 of the fp32 bytes).
Measured here (BENCHMARKS.md): FC layers at batch 1 are faster in both activation forms; at 4-64 rows the
int8-input form is 2.9-5.3x fp32 and the float form 0.95-2x; Convs (compute-bound, weights small next to the
activations) are not faster, so they are rewritten only with measure=0.
Opt-in (not in the default method set): the error it costs is decided by the budget like any lossy pass.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import DOMAIN
from onnxopt.passes.convolution import explicit_pads
from onnxopt.passes.dense import dense_bias, dense_kn, dense_problem, dense_weight, output_rows
from onnxopt.passes.lowbit_quantize import dequantize, gptq, inverse_factor, rtn
from onnxopt.passes.prune import conv_kn, conv_problem, layer_problem
from onnxopt.reference.lowbit import lowbit_matmul, pack_codes, padded_k
from onnxopt.rewrite import (
    Decline,
    Option,
    Pass,
    PassContext,
    constant_value,
    new_name,
    replace_node,
    weight_problem,
)
from onnxopt.timing import keep_faster

BITS = (2, 3, 4)
GROUPS = (128, 64, 32)
MIN_K = 32  # fewer inputs than one group: the scales would outweigh the codes
MAX_FIT_ROWS = 4096  # calibration rows for H (and as many held out)
ROUNDINGS = ("auto", "rtn", "gptq")
ACT_BITS = ("auto", "0", "8")


def stored_bytes(K: int, N: int, bits: int, G: int, bias: bool) -> int:
    """Bytes of Q, S, Z (and B): codes of the padded K, one float32 scale and one uint8 zero per group."""
    Kp = padded_k(K, G)
    return N * Kp * bits // 8 + 5 * N * (Kp // G) + (4 * N if bias else 0)


def relative_error(W: np.ndarray, Wq: np.ndarray, X: np.ndarray | None, bias: np.ndarray | None) -> float:
    """||X (W - Wq)|| / ||X W + b|| on rows X (W, Wq: K x N), or ||W - Wq|| / ||W|| without rows."""
    if X is None:
        return float(np.linalg.norm(W - Wq) / max(np.linalg.norm(W), 1e-30))
    Xd = X.astype(np.float64)
    ref = Xd @ W + (0.0 if bias is None else bias)
    return float(np.linalg.norm(Xd @ (W - Wq)) / max(np.linalg.norm(ref), 1e-30))


def quantize(
    W: np.ndarray,
    X: np.ndarray | None,
    bias: np.ndarray | None,
    bits: int,
    G: int,
    rounding: str = "auto",
    factor: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, float]:
    """(rounding used, Q packed, S, Z, estimated error) of W (K x N) at `bits` and group size G; X the layer's
    calibration rows (or None); `factor` GPTQ's (U, dead) of the training half of X, when already computed."""
    K, N = W.shape
    Kp = padded_k(K, G)
    Wp = np.zeros((Kp, N), np.float64)
    Wp[:K] = W
    train, held = (
        (None, None) if X is None or len(X) < 4 else (X[0::2][:MAX_FIT_ROWS], X[1::2][:MAX_FIT_ROWS])
    )
    kinds = (
        ["rtn"] if train is None or rounding == "rtn" else ["gptq"] if rounding == "gptq" else ["rtn", "gptq"]
    )
    best = None
    for kind in kinds:
        if kind == "rtn":
            q, S, Z = rtn(Wp, bits, G)
        else:
            U, dead = factor if factor is not None else inverse_factor(train, Kp)
            q, S, Z = gptq(Wp, U, dead, bits, G)
        err = relative_error(W.astype(np.float64), dequantize(q, S, Z, G)[:K], held, bias)
        if best is None or err < best[-1]:
            best = (kind, q, S, Z, err)
    kind, q, S, Z, err = best
    return kind, pack_codes(q, bits), S, Z, err


def act_error(W, X, bias, Q, S, Z, G) -> float:
    """||X W + b - LowBitMatMul_act8(X)|| / ||X W + b|| on rows X: the weight and the activation rounding."""
    K, N = W.shape
    ref = X.astype(np.float64) @ W + (0.0 if bias is None else bias)
    Y = lowbit_matmul(X.astype(np.float32), Q, S, Z, bias, K=K, N=N, bits=4, group_size=G, act_bits=8)
    return float(np.linalg.norm(Y - ref) / max(np.linalg.norm(ref), 1e-30))


def _act_variants(act: str, bits: int, calibrated: bool) -> tuple[int, ...]:
    """Activation widths offered for one option, the faster first (the manager takes the first that fits):
    int8 inputs need 4-bit codes, and under `auto` calibration rows to measure their error on."""
    if act == "8":
        return (8,)
    return (8, 0) if act == "auto" and bits == 4 and calibrated else (0,)


def _flag_list(value: str) -> list[int]:
    return [int(v) for v in value.replace(";", ",").split(",") if v.strip()]


class LowBit(Pass):
    name = "lowbit"
    op_types = ("Gemm", "MatMul", "Conv")
    lossy = True
    default = False
    measured = True  # unless lowbit.measure=0: see the module docstring
    summary = (
        "Gemm/MatMul/Conv -> LowBitMatMul/LowBitConv (weight-only group-wise 2/3/4-bit codes, RTN or GPTQ)"
    )
    custom_ops = ("LowBitMatMul", "LowBitConv")

    def check(self, node: gs.Node, ctx: PassContext) -> str | None:
        layers = ctx.setting("layers", str, "all")
        if layers not in ("all", "fc", "conv"):
            return f"lowbit.layers={layers!r} is not all, fc or conv"
        if layers != "all" and layers != ("conv" if node.op == "Conv" else "fc"):
            return f"{node.op} layers are not selected (lowbit.layers={layers})"
        if node.op == "Conv":
            if problem := conv_problem(node, ctx):
                return problem
            K, N = conv_kn(node)
            if K < MIN_K:
                return f"filters of C kh kw = {K} < {MIN_K} weights: a group's scale and zero outweigh them"
            return None
        if problem := weight_problem(node) or dense_problem(node, ctx):
            return problem
        K, N = dense_kn(node)
        if K < MIN_K:
            return f"weight {K}x{N} has K < {MIN_K}: one group's scale and zero would outweigh its codes"
        if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            if np.size(constant_value(node.inputs[2])) not in (1, N):
                return "bias does not broadcast along N only"
        return None

    def activations_needed(self, node: gs.Node) -> list[str]:
        return [node.inputs[0].name]

    def options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        W, bias, X, rows = self._layer(node, ctx)
        K, N = W.shape
        rounding = ctx.setting("rounding", str, "auto").lower()
        if rounding not in ROUNDINGS:
            raise Decline(f"lowbit.rounding must be one of {ROUNDINGS}, got {rounding!r}")
        act = ctx.setting("act_bits", str, "auto").lower() if node.op != "Conv" else "0"
        if act not in ACT_BITS:
            raise Decline(f"lowbit.act_bits must be one of {ACT_BITS}, got {act!r}")
        bits_list = ctx.setting("bits", _flag_list, list(BITS))
        if act == "8":
            bits_list = [b for b in bits_list if b == 4]
            if not bits_list:
                raise Decline("lowbit.act_bits=8 needs 4-bit codes, and lowbit.bits excludes 4")
        groups = ctx.setting("group_size", _flag_list, list(GROUPS))
        if bad := [b for b in bits_list if b not in BITS] + [g for g in groups if g < 32 or g % 32]:
            raise Decline(f"unsupported bits / group_size {bad}: bits in {BITS}, group sizes multiples of 32")
        choices = sorted(
            ((b, g) for b in bits_list for g in groups),
            key=lambda c: stored_bytes(K, N, *c, bias is not None),
        )
        held = X[1::2][:MAX_FIT_ROWS] if X is not None and len(X) >= 4 else None
        factors: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        options, tried = [], []
        for bits, G in choices:
            Kp = padded_k(K, G)
            factor = None
            if held is not None and rounding != "rtn":
                if Kp not in factors:
                    factors[Kp] = inverse_factor(X[0::2][:MAX_FIT_ROWS], Kp)
                factor = factors[Kp]
            kind, Q, S, Z, err = quantize(W, X, bias, bits, G, rounding, factor)
            load = None
            size = stored_bytes(K, N, bits, G, bias is not None)
            for a in _act_variants(act, bits, held is not None):
                e = act_error(W, held, bias, Q, S, Z, G) if a == 8 and held is not None else err
                tried.append(f"{bits}b/G{G}{'/a8' if a else ''}: {e:.3g}")
                if e > ctx.local_tolerance:
                    continue
                load = load or ctx.park(Q, S, Z)
                options.append(
                    Option(
                        est_error=e,
                        params_after=N * Kp + 2 * N * (Kp // G) + (N if bias is not None else 0),
                        bytes_after=size,
                        flops_after=2 * rows * K * N,
                        emit=self._emitter(load, node, K, N, bits, G, bias, a),
                        detail={"bits": bits, "group_size": G, "rounding": kind, "shape": [K, N]}
                        | ({"act_bits": 8} if a else {}),
                    )
                )
        if not options:
            raise Decline(
                f"no bit width / group size fits the tolerance {ctx.local_tolerance:g}: estimated errors "
                + ", ".join(tried)
            )
        faster = {id(o) for o in keep_faster(node, ctx, options)}  # Decline when none is; all with measure=0
        return [o for o in options if id(o) in faster]  # most compressive first, as the manager expects

    @staticmethod
    def _layer(node: gs.Node, ctx: PassContext):
        """(W K x N, bias or None, calibration rows [n, K] or None, output rows the layer computes)."""
        if node.op == "Conv":  # rows: up to 8192 seeded input patches (as prune), half of them held out
            return layer_problem(node, ctx)
        W = dense_weight(node)
        K, N = W.shape
        X = ctx.activations.get(node.inputs[0].name)
        return W, dense_bias(node, N), X.reshape(-1, K) if X is not None else None, output_rows(node, ctx, N)

    def _emitter(
        self,
        load,
        node: gs.Node,
        K: int,
        N: int,
        bits: int,
        G: int,
        bias: np.ndarray | None,
        act_bits: int = 0,
    ):
        if node.op == "Conv":
            M, C, kh, kw = (int(d) for d in node.inputs[1].shape)
            a = node.attrs
            op, attrs = (
                "LowBitConv",
                {
                    "C": C,
                    "M": M,
                    "kernel_shape": [kh, kw],
                    "strides": [int(v) for v in a.get("strides", [1, 1])],
                    "pads": explicit_pads(node),
                    "dilations": [int(v) for v in a.get("dilations", [1, 1])],
                },
            )
        else:
            op, attrs = "LowBitMatMul", {"K": K, "N": N} | ({"act_bits": act_bits} if act_bits else {})

        def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
            Q, S, Z = load()
            inputs = [node.inputs[0]] + [
                gs.Constant(new_name(prefix, n), a) for n, a in (("Q", Q), ("S", S), ("Z", Z))
            ]
            if bias is not None:
                inputs.append(gs.Constant(new_name(prefix, "B"), bias.astype(np.float32)))
            new = gs.Node(
                op,
                new_name(prefix, "lowbit"),
                attrs={**attrs, "bits": bits, "group_size": G},
                inputs=inputs,
                outputs=[node.outputs[0]],
                domain=DOMAIN,
            )
            return replace_node(graph, node, [new])

        return emit
