"""binary: Gemm/MatMul and Conv (group 1, any kernel size) with a constant float32 weight become layers
with one bit per weight (op semantics and bit layout in onnxopt.reference.binary, kernels in
custom_ops/binary*.cc).

Weights, per output n (column of W as K x N, or filter of a Conv):
  sign (XNOR-Net, Rastegari et al. 2016; binary-weight networks): b = [W >= 0], alpha = mean |W_n|, the
      least-squares scale of sign(W_n): W~ = alpha (2 b - 1).
  01 ({0,1} weights, after Kim et al.): b = [W >= mean(W_n)], and W~ = a b + c with c the mean of the weights
      where b = 0 and a + c the mean where b = 1 (the least-squares a, c for that b).
Modes:
  partial: binary weights, float activations: y = x W~ + bias (BinaryMatMul only: a Conv gains no arithmetic
      from it, every multiply-add stays).
  full: activations binarized too, sign(x) scaled by the mean |x| of the row or receptive field
      (XNOR-Net's K; BinaryMatMul mode=full, BinaryConv), centred: x is binarized around T, the mean of each
      input feature (channel of a Conv) on the calibration inputs, and the op adds T W~ (input T). Without it,
      a layer after a ReLU sees only +1 signs and its output no longer depends on its input
      (`binary.center=0` turns it off).
  k-bit activations (W1Ak, DoReFa-style; `binary.act_bits`, default 1,2,3,4, where 1 is the sign mode above):
      mode full with act_bits = k >= 2 quantizes each input uniformly to codes u in [0, 2^k - 1] of a clipped
      range [T, T + s (2^k - 1)], calibrated per layer on the calibration activations: T = 0 for inputs that
      are never negative (after a ReLU) or with `binary.center=0`, else the range's low clip; the clips are
      the pair of quantiles (q, 1 - q), or 0 and the q-quantile, whose codes have the least squared error
      (act_range). The kernels run the k bit planes through the AND-popcount loop: k times the binary
      work, against 1 for sign activations and 64 (a masked add per weight) for float ones.
Layers whose bits would not be smaller than their float weights (a Conv on one input channel pads each
tap's channels to 64 bits) are declined. `--set binary.mode=full|partial|auto` and
`binary.weights=sign|01|auto` pick them (auto: every one that applies); `binary.layers=all|fc|conv|NAME,...`
the layers tried (default all). Options are ordered most compressive first (full before partial, fewer
activation bits first, sign before 01) and the budget picks: post-training binarization of a network trained
in full precision usually breaks any budget, and then the node is declined with every option's estimated
error in the reason.

Estimated error: ||Y~ - Y||_F / ||Y||_F of the layer's output on calibration inputs (up to 4096 rows of a
Gemm/MatMul, up to 4 images of a Conv), Y~ computed by the op's numpy reference.
Opt-in (not in the default method set).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import DOMAIN
from onnxopt.passes.convolution import explicit_pads, has_bias
from onnxopt.passes.dense import dense_bias, dense_kn, dense_problem, dense_weight, output_rows
from onnxopt.reference.binary import (
    MAX_ACT_BITS,
    WORD,
    act_codes,
    binary_conv,
    binary_matmul,
    pack_bits,
    padded,
    windows,
)
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

MODES = ("full", "partial")
WEIGHTS = ("sign", "01")
MAX_ROWS = 4096  # calibration rows of a Gemm/MatMul for the error estimate
MAX_IMAGES = 4  # calibration images of a Conv
DEFAULT_ACT_BITS = "1,2,3,4"
# Tail mass q cut off by the candidate clips of the k-bit range (0: the calibration min / max).
CLIP_TAILS = (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
MAX_RANGE_VALUES = 1 << 20  # activations the range is fitted on


def fit(W: np.ndarray, weights: str) -> tuple[np.ndarray, np.ndarray]:
    """(b [N, K] uint8 bits, S float32 [N, 1] or [N, 2]) of W (K x N; a Conv's M x C kh kw transposed)."""
    Wt = W.T.astype(np.float64)
    if weights == "sign":
        b = Wt >= 0
        return b.astype(np.uint8), np.abs(Wt).mean(axis=1, keepdims=True).astype(np.float32)
    b = Wt >= Wt.mean(axis=1, keepdims=True)
    ones = b.sum(axis=1)
    mean1 = np.where(b, Wt, 0).sum(axis=1) / np.maximum(ones, 1)
    mean0 = np.where(b, 0, Wt).sum(axis=1) / np.maximum(b.shape[1] - ones, 1)
    c = np.where(ones < b.shape[1], mean0, mean1)  # a constant row: b all ones, a = 0
    a = np.where(ones > 0, mean1 - c, 0.0)
    return b.astype(np.uint8), np.stack([a, c], axis=1).astype(np.float32)


def dequantize(b: np.ndarray, S: np.ndarray, weights: str) -> np.ndarray:
    """W~ [K, N] (float64) that (b [N, K], S) stand for."""
    S = S.astype(np.float64)
    Wt = S[:, :1] * (2.0 * b - 1.0) if weights == "sign" else S[:, :1] * b + S[:, 1:]
    return Wt.T


def relative_error(Y_hat: np.ndarray, Y: np.ndarray) -> float:
    return float(np.linalg.norm(Y_hat.astype(np.float64) - Y) / max(np.linalg.norm(Y), 1e-30))


def act_range(X: np.ndarray, act_bits: int, signed: bool) -> tuple[float, float]:
    """(T, s) of the k-bit codes of X: the candidate clips (CLIP_TAILS; low clip 0 unless `signed`) whose
    codes reconstruct X with the least squared error. X may be any shape; at most MAX_RANGE_VALUES of it
    are used (evenly spaced)."""
    x = np.asarray(X, np.float32).reshape(-1)
    x = x[:: max(1, x.size // MAX_RANGE_VALUES)]
    levels = 2**act_bits - 1
    best = None
    for q in CLIP_TAILS:
        lo = float(np.quantile(x, q)) if signed else 0.0
        hi = float(np.quantile(x, 1.0 - q))
        if hi <= lo:
            continue
        s = (hi - lo) / levels
        xq = lo + s * act_codes(x, np.float32(lo), act_bits, s)
        err = float(np.mean((xq - x) ** 2))
        if best is None or err < best[0]:
            best = (err, lo, s)
    if best is None:  # a constant input (or one never above 0): any step; codes 0 but at one level
        return (0.0, 1.0)
    return best[1], best[2]


def _act_bits(ctx: PassContext) -> list[int]:
    raw = ctx.setting("act_bits", str, DEFAULT_ACT_BITS)
    try:
        bits = sorted({int(v) for v in raw.replace(";", ",").split(",") if v.strip()})
    except ValueError:
        bits = []
    if not bits or not all(1 <= b <= MAX_ACT_BITS for b in bits):
        raise Decline(f"binary.act_bits must be a list of ints in [1, {MAX_ACT_BITS}], got {raw!r}")
    return bits


def _choices(ctx: PassContext, conv: bool) -> list[tuple[str, str, int]]:
    """(mode, weights, act_bits) of the options, most compressive first (act_bits 0: float activations)."""
    mode = ctx.setting("mode", str, "auto").lower()
    weights = ctx.setting("weights", str, "auto").lower()
    if mode not in ("auto", *MODES) or weights not in ("auto", *WEIGHTS):
        raise Decline(
            f"binary.mode must be auto|full|partial and binary.weights auto|sign|01, got {mode}, {weights}"
        )
    modes = MODES if mode == "auto" else (mode,)
    if conv:
        if "full" not in modes:
            raise Decline(
                "partial binarization of a Conv saves no arithmetic (every multiply-add stays): not offered"
            )
        modes = ("full",)
    kinds = WEIGHTS if weights == "auto" else (weights,)
    bits = _act_bits(ctx) if "full" in modes else []
    full = [("full", w, b) for b in bits for w in kinds] if "full" in modes else []
    return full + ([("partial", w, 0) for w in kinds] if "partial" in modes else [])


def _label(mode: str, weights: str, act_bits: int) -> str:
    return f"{mode}/{weights}" if act_bits <= 1 else f"a{act_bits}/{weights}"


def _centred(ctx: PassContext) -> bool:
    return ctx.setting("center", lambda v: v not in ("0", "false", "no"), True)


def conv_problem(node: gs.Node, ctx: PassContext) -> str | None:
    """Why a Conv cannot become a BinaryConv."""
    shape = tuple(node.inputs[1].shape)
    if len(shape) != 4:
        return f"weight has rank {len(shape)}, not 4 (only 2-D convolutions)"
    a = node.attrs
    if a.get("group", 1) != 1:
        return f"group={a['group']}: only group 1 is supported"
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"auto_pad={a['auto_pad']} is not supported (explicit pads only)"
    if ctx.consumers.get(node.inputs[1].name, 0) > 1:
        return "weight initializer is shared with other nodes"
    if has_bias(node) and not isinstance(node.inputs[2], gs.Constant):
        return "bias is not constant"
    x = ctx.shapes.get(node.inputs[0].name)
    if x is None or len(x) != 4:
        return "input is not known to be 4-D (NCHW)"
    return None


def float_conv(X: np.ndarray, Wc: np.ndarray, attrs: dict) -> np.ndarray:
    """The float64 convolution the node computes (no bias), through the reference's tap windows."""
    kh, kw = attrs["kernel_shape"]
    top, left, bottom, right = attrs["pads"]
    x = np.pad(X.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    (sh, sw), (dh, dw) = attrs["strides"], attrs["dilations"]
    OH = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    OW = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    return np.einsum(
        "ncyxhw,mcyx->nmhw", windows(x, kh, kw, OH, OW, (sh, sw), (dh, dw)), Wc.astype(np.float64)
    )


class Binary(Pass):
    name = "binary"
    op_types = ("Gemm", "MatMul", "Conv")
    lossy = True
    default = False
    summary = (
        "Gemm/MatMul/Conv -> BinaryMatMul / BinaryConv (1-bit weights; XNOR-popcount on binary activations)"
    )
    custom_ops = ("BinaryMatMul", "BinaryConv")

    def check(self, node: gs.Node, ctx: PassContext) -> str | None:
        layers = ctx.setting("layers", str, "all")
        kind = "conv" if node.op == "Conv" else "fc"
        if layers not in ("all", kind) and node.name not in layers.replace(";", ",").split(","):
            return f"not selected (binary.layers={layers})"
        if problem := weight_problem(node):
            return problem
        if node.op == "Conv":
            return conv_problem(node, ctx)
        if problem := dense_problem(node, ctx):
            return problem
        if node.op == "Gemm" and has_bias(node):
            if np.size(constant_value(node.inputs[2])) not in (1, dense_kn(node)[1]):
                return "bias does not broadcast along N only"
        return None

    def activations_needed(self, node: gs.Node) -> list[str]:
        return [node.inputs[0].name]

    def options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        if node.op == "Conv":
            return self._conv_options(node, ctx)
        W = dense_weight(node)
        K, N = W.shape
        bias = dense_bias(node, N)
        X = ctx.activations.get(node.inputs[0].name)
        if X is None:
            raise Decline(
                "no calibration activations: the error of binarized activations cannot be estimated"
            )
        X = X.reshape(-1, K)[:MAX_ROWS]
        Y = X.astype(np.float64) @ W.astype(np.float64) + (0.0 if bias is None else bias)
        rows = output_rows(node, ctx, N)
        center = X.astype(np.float64).mean(axis=0).astype(np.float32) if _centred(ctx) else None
        options, tried = [], []
        for mode, weights, act_bits in _choices(ctx, conv=False):
            T, act = center if mode == "full" else None, {}
            if act_bits > 1:
                T, act = self._act(X, act_bits, K, ctx)
            B = bias if T is None or bias is not None else np.zeros(N, np.float32)
            b, S = fit(W, weights)
            bits = np.zeros((N, padded(K)), np.uint8)
            bits[:, :K] = b
            Wbits = pack_bits(bits)
            attrs = {"K": K, "N": N, "mode": mode, "weights": weights, **act}
            err = relative_error(binary_matmul(X, Wbits, S, B, **attrs, T=T), Y)
            tried.append(f"{_label(mode, weights, act_bits)}: {err:.3g}")
            if err > ctx.local_tolerance:
                continue
            options.append(self._option(err, Wbits, S, B, T, attrs, "BinaryMatMul", rows * K * N, mode))
        return self._fitting(options, tried, ctx)

    @staticmethod
    def _act(X: np.ndarray, act_bits: int, count: int, ctx: PassContext) -> tuple[np.ndarray | None, dict]:
        """T (None for a low clip of 0) and the k-bit attributes of input X (`count` features or channels)."""
        lo, s = act_range(X, act_bits, signed=_centred(ctx) and float(X.min()) < 0)
        T = None if lo == 0.0 else np.full(count, lo, np.float32)
        return T, {"act_bits": act_bits, "act_scale": float(np.float32(s))}

    def _conv_options(self, node: gs.Node, ctx: PassContext) -> list[Option]:
        Wc = constant_value(node.inputs[1]).astype(np.float32)
        M, C, kh, kw = Wc.shape
        bias = constant_value(node.inputs[2]).astype(np.float32).reshape(M) if has_bias(node) else None
        a = node.attrs
        attrs = {
            "C": C,
            "kernel_shape": [kh, kw],
            "strides": [int(s) for s in a.get("strides", [1, 1])],
            "pads": explicit_pads(node),
            "dilations": [int(d) for d in a.get("dilations", [1, 1])],
        }
        X = ctx.activations.get(node.inputs[0].name)
        if X is None:
            raise Decline(
                "no calibration activations: the error of binarized activations cannot be estimated"
            )
        X = X[:MAX_IMAGES]
        Y = float_conv(X, Wc, attrs) + (0.0 if bias is None else bias[:, None, None])
        out = ctx.shapes.get(node.outputs[0].name)
        pixels = int(np.prod(out[2:])) if out and all(isinstance(d, int) for d in out) else 1
        if padded(C) * kh * kw // 8 >= 4 * C * kh * kw:
            raise Decline(
                f"C={C}: bits padded to 64 channels per tap would not be smaller than the float weight"
            )
        center = X.astype(np.float64).mean(axis=(0, 2, 3)).astype(np.float32) if _centred(ctx) else None
        options, tried = [], []
        for mode, weights, act_bits in _choices(ctx, conv=True):
            T, act = center, {}
            if act_bits > 1:
                T, act = self._act(X, act_bits, C, ctx)
            B = bias if T is None or bias is not None else np.zeros(M, np.float32)
            # b over (c, dy, dx) per filter, stored tap-major with channels padded to 64 (reference layout).
            b, S = fit(Wc.reshape(M, -1).T, weights)
            bits = np.zeros((M, kh, kw, padded(C)), np.uint8)
            bits[..., :C] = b.reshape(M, C, kh, kw).transpose(0, 2, 3, 1)
            Wbits = pack_bits(bits.reshape(M, -1))
            node_attrs = {**attrs, "weights": weights, **act}
            err = relative_error(binary_conv(X, Wbits, S, B, **node_attrs, T=T), Y)
            tried.append(f"{_label(mode, weights, act_bits)}: {err:.3g}")
            if err > ctx.local_tolerance:
                continue
            options.append(
                self._option(err, Wbits, S, B, T, node_attrs, "BinaryConv", pixels * M * C * kh * kw, mode)
            )
        return self._fitting(options, tried, ctx)

    @staticmethod
    def _fitting(options: list[Option], tried: list[str], ctx: PassContext) -> list[Option]:
        if not options:
            raise Decline(
                f"binarization breaks the tolerance {ctx.local_tolerance:g}: estimated errors "
                + ", ".join(tried)
            )
        return options

    def _option(self, err, Wbits, S, bias, T, attrs: dict, op: str, macs: int, mode: str) -> Option:
        extra = (0 if bias is None else bias.size) + (0 if T is None else T.size)
        act_bits = attrs.get("act_bits", 1) if mode == "full" else 0
        return Option(
            est_error=err,
            params_after=Wbits.size * 8 + S.size + extra,  # one parameter per bit
            bytes_after=Wbits.nbytes + S.nbytes + 4 * extra,
            # full: one AND + popcount per 64 binary multiply-adds per activation bit; partial: one masked add
            # per weight
            flops_after=2 * act_bits * macs // WORD if mode == "full" else macs,
            emit=self._emitter(op, Wbits, S, bias, T, attrs),
            detail={
                "op": op,
                "mode": mode,
                "weights": attrs["weights"],
                "centred": T is not None,
                "act_bits": act_bits,
            },
        )

    @staticmethod
    def _emitter(op: str, Wbits: np.ndarray, S: np.ndarray, bias: np.ndarray | None, T, attrs: dict):
        def emit(graph: gs.Graph, node: gs.Node, prefix: str) -> list[gs.Node]:
            inputs = [
                node.inputs[0],
                gs.Constant(new_name(prefix, "Wbits"), Wbits),
                gs.Constant(new_name(prefix, "S"), S),
            ]
            if bias is not None:
                inputs.append(gs.Constant(new_name(prefix, "B"), bias.astype(np.float32)))
            if T is not None:
                inputs.append(gs.Constant(new_name(prefix, "T"), T))
            new = gs.Node(
                op,
                new_name(prefix, "binary"),
                attrs=dict(attrs),
                inputs=inputs,
                outputs=[node.outputs[0]],
                domain=DOMAIN,
            )
            return replace_node(graph, node, [new])

        return emit
