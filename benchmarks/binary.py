"""BinaryMatMul and BinaryConv against onnxruntime's fp32 MatMul and Conv on single layers: full binarization
(XNOR-Net: binary weights and activations, W1A1), k-bit activations (W1A2, W1A3, W1A4: DoReFa-style codes,
bit-serial AND-popcount, `--act-bits`) and partial (binary weights, float activations) at batch 1.

Ratios are fp32 time / binary time, measured in one process with onnxopt.timing.median_times (interleaved,
64 MiB cache flush before every run, spinning off), at 1 and 2 threads. Weights are random (speed does not
depend on their values). Issue goals: full 3x3 conv 64@56x56 and 128@28x28 >= 4x, Gemm 1x4096x4096 >= 10x at
one thread; weights 32x smaller (the weight-bytes column: fp32 bytes / (bits + scales) bytes).

Run from the repo root after scripts/setup.sh (under the machine's benchmark lock):
    flock /tmp/onnxopt-bench.lock .venv/bin/python benchmarks/binary.py
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxopt.reference.binary import pack_bits, padded  # noqa: E402
from onnxopt.timing import median_times  # noqa: E402

OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("onnxopt", 1)]


def _model(node: onnx.NodeProto, inits: list, x_shape: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "layer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=10)


def _bytes(inits: list) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in inits)


def fc(K: int, N: int, mode: str | None, act_bits: int = 1) -> tuple[onnx.ModelProto, int]:
    """fp32 MatMul (mode None) or BinaryMatMul of a K x N layer at batch 1, and its weight bytes."""
    rng = np.random.default_rng(0)
    if mode is None:
        inits = [numpy_helper.from_array((rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32), "W")]
        return _model(helper.make_node("MatMul", ["X", "W"], ["Y"]), inits, [1, K]), _bytes(inits)
    b = np.zeros((N, padded(K)), np.uint8)
    b[:, :K] = rng.integers(0, 2, (N, K))
    S = (rng.random((N, 1)) / np.sqrt(K)).astype(np.float32)
    inits = [numpy_helper.from_array(pack_bits(b), "Wbits"), numpy_helper.from_array(S, "S")]
    node = helper.make_node(
        "BinaryMatMul", ["X", "Wbits", "S"], ["Y"], domain="onnxopt", K=K, N=N, mode=mode, weights="sign"
    )
    if act_bits > 1:  # codes of a standard normal input over [-2, 2]: every bit plane busy
        T = numpy_helper.from_array(np.full(K, -2.0, np.float32), "T")
        B = numpy_helper.from_array(np.zeros(N, np.float32), "B")
        inits += [B, T]
        node.input.extend(["B", "T"])
        node.attribute.extend(
            [
                helper.make_attribute("act_bits", act_bits),
                helper.make_attribute("act_scale", 4 / (2**act_bits - 1)),
            ]
        )
    return _model(node, inits, [1, K]), _bytes(inits)


def conv(C: int, H: int, M: int, binary: bool, act_bits: int = 1) -> tuple[onnx.ModelProto, int]:
    """fp32 Conv or BinaryConv, 3x3, stride 1, pad 1, C -> M channels on H x H, batch 1, with a bias; k-bit
    activations (act_bits > 1) with an offset T, the codes of a standard normal input spanning [-2, 2]."""
    rng = np.random.default_rng(0)
    bias = numpy_helper.from_array(rng.standard_normal(M).astype(np.float32), "B")
    attrs = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    if not binary:
        W = (rng.standard_normal((M, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
        inits = [numpy_helper.from_array(W, "W"), bias]
        return _model(helper.make_node("Conv", ["X", "W", "B"], ["Y"], **attrs), inits, [1, C, H, H]), _bytes(
            inits
        )
    b = np.zeros((M, 3, 3, padded(C)), np.uint8)
    b[..., :C] = rng.integers(0, 2, (M, 3, 3, C))
    S = (rng.random((M, 1)) / np.sqrt(9 * C)).astype(np.float32)
    inits = [
        numpy_helper.from_array(pack_bits(b.reshape(M, -1)), "Wbits"),
        numpy_helper.from_array(S, "S"),
        bias,
    ]
    node = helper.make_node(
        "BinaryConv", ["X", "Wbits", "S", "B"], ["Y"], domain="onnxopt", C=C, weights="sign", **attrs
    )
    if act_bits > 1:
        inits.append(numpy_helper.from_array(np.full(C, -2.0, np.float32), "T"))
        node.input.append("T")
        node.attribute.extend(
            [
                helper.make_attribute("act_bits", act_bits),
                helper.make_attribute("act_scale", 4 / (2**act_bits - 1)),
            ]
        )
    return _model(node, inits, [1, C, H, H]), _bytes(inits)


def _cell(t0: float, t: float) -> str:
    return f"{t:.3f} ({t0 / t:.1f}x)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fc", nargs="*", default=["4096x4096", "1024x1024"], help="KxN of FC layers")
    ap.add_argument("--convs", nargs="*", default=["64@56", "128@28", "256@14"], help="C@H (M = C), 3x3")
    ap.add_argument("--act-bits", nargs="*", type=int, default=[2, 3, 4], help="k-bit activation columns")
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    kbits = args.act_bits
    head = " | ".join(f"W1A{k} ms (x)" for k in kbits)
    rows = [
        f"| layer | threads | fp32 ms | W1A1 (full) ms (x) | {head} | partial ms (x) "
        "| weight bytes fp32 / binary |",
        "|---|---|---|---|" + "---|" * len(kbits) + "---|---|",
    ]
    for shape in args.fc:
        K, N = (int(v) for v in shape.split("x"))
        (base, b0), (full, b1), (part, _) = fc(K, N, None), fc(K, N, "full"), fc(K, N, "partial")
        kmodels = [fc(K, N, "full", k)[0] for k in kbits]
        for threads in args.threads:
            t0, t1, t2, *tk = median_times([base, full, part, *kmodels], threads, rounds=args.rounds)
            cells = [f"FC 1x{K}x{N}", str(threads), f"{t0:.3f}", _cell(t0, t1), *(_cell(t0, t) for t in tk)]
            rows.append("| " + " | ".join([*cells, _cell(t0, t2), f"{b0 / b1:.1f}x"]) + " |")
            print(rows[-1], file=sys.stderr, flush=True)
    for spec in args.convs:
        C, H = (int(v) for v in spec.split("@"))
        (base, b0), (binary, b1) = conv(C, H, C, False), conv(C, H, C, True)
        kmodels = [conv(C, H, C, True, k)[0] for k in kbits]
        for threads in args.threads:
            t0, t1, *tk = median_times([base, binary, *kmodels], threads, rounds=args.rounds)
            cells = [f"Conv 3x3 {C}->{C} @{H}x{H}", str(threads), f"{t0:.3f}", _cell(t0, t1)]
            cells += [_cell(t0, t) for t in tk]
            rows.append("| " + " | ".join([*cells, "-", f"{b0 / b1:.1f}x"]) + " |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
