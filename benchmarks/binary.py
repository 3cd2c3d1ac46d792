"""BinaryMatMul and BinaryConv against onnxruntime's fp32 MatMul and Conv on single layers: full binarization
(XNOR-Net: binary weights and activations) and partial (binary weights, float activations) at batch 1.

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


def fc(K: int, N: int, mode: str | None) -> tuple[onnx.ModelProto, int]:
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
    return _model(node, inits, [1, K]), _bytes(inits)


def conv(C: int, H: int, M: int, binary: bool) -> tuple[onnx.ModelProto, int]:
    """fp32 Conv or BinaryConv, 3x3, stride 1, pad 1, C -> M channels on H x H, batch 1, with a bias."""
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
    return _model(node, inits, [1, C, H, H]), _bytes(inits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fc", nargs="*", default=["4096x4096", "1024x1024"], help="KxN of FC layers")
    ap.add_argument("--convs", nargs="*", default=["64@56", "128@28", "256@14"], help="C@H (M = C), 3x3")
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    rows = [
        "| layer | threads | fp32 ms | binary full ms (x) | binary partial ms (x) "
        "| weight bytes fp32 / binary |",
        "|---|---|---|---|---|---|",
    ]
    for shape in args.fc:
        K, N = (int(v) for v in shape.split("x"))
        (base, b0), (full, b1), (part, _) = fc(K, N, None), fc(K, N, "full"), fc(K, N, "partial")
        for threads in (1, 2):
            t0, t1, t2 = median_times([base, full, part], threads, rounds=args.rounds)
            rows.append(
                f"| FC 1x{K}x{N} | {threads} | {t0:.3f} | {t1:.3f} ({t0 / t1:.1f}x) "
                f"| {t2:.3f} ({t0 / t2:.1f}x) "
                f"| {b0 / b1:.1f}x |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    for spec in args.convs:
        C, H = (int(v) for v in spec.split("@"))
        (base, b0), (binary, b1) = conv(C, H, C, False), conv(C, H, C, True)
        for threads in (1, 2):
            t0, t1 = median_times([base, binary], threads, rounds=args.rounds)
            rows.append(
                f"| Conv 3x3 {C}->{C} @{H}x{H} | {threads} | {t0:.3f} | {t1:.3f} ({t0 / t1:.1f}x) | - "
                f"| {b0 / b1:.1f}x |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
