"""LowBitConv against onnxruntime on one Conv layer at batch 1: fp32 Conv and int8 QLinearConv (static
quantization of the same Conv by onnxruntime.quantization: QOperator format, per-channel int8 weights, uint8
activations calibrated on random inputs).

Ratios are fp32 Conv time / other time, measured in one process with onnxopt.timing.median_times (interleaved,
64 MiB cache flush before every run, spinning off), at 1 and 2 threads. Weights are random: speed does not
depend on their values. Layers are C:M:S:k (input channels, filters, square input side, square kernel; pads
keep the side, stride 1); the defaults are three ResNet-like layers and Fashion-MNIST's conv2-conv4.

Run from the repo root after scripts/setup.sh (under the machine's benchmark lock):
    flock /tmp/onnxopt-bench.lock .venv/bin/python benchmarks/lowbit_conv.py [--layers 64:64:56:3 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxopt.reference.lowbit import pack_codes, padded_k  # noqa: E402
from onnxopt.timing import median_times  # noqa: E402

OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("onnxopt", 1)]
LAYERS = ["64:64:56:3", "128:128:28:3", "256:64:56:1", "64:64:14:3", "64:128:7:3", "128:256:7:3"]


def _model(node: onnx.NodeProto, inits: list, C: int, M: int, S: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, C, S, S])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, M, S, S])],
        inits,
    )
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=10)


def dense(C: int, M: int, S: int, k: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((M, C, k, k)) / np.sqrt(C * k * k)).astype(np.float32)
    B = rng.standard_normal(M).astype(np.float32)
    p = k // 2
    node = helper.make_node("Conv", ["X", "W", "B"], ["Y"], kernel_shape=[k, k], pads=[p] * 4)
    return _model(node, [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")], C, M, S)


def lowbit(C: int, M: int, S: int, k: int, bits: int, G: int) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    K = C * k * k
    Kp = padded_k(K, G)
    Q = pack_codes(rng.integers(0, 1 << bits, (Kp, M), dtype=np.uint8), bits)
    Sc = (rng.random((M, Kp // G)) / np.sqrt(K)).astype(np.float32)
    Z = rng.integers(0, 1 << bits, (M, Kp // G), dtype=np.uint8)
    B = rng.standard_normal(M).astype(np.float32)
    p = k // 2
    node = helper.make_node(
        "LowBitConv",
        ["X", "Q", "S", "Z", "B"],
        ["Y"],
        domain="onnxopt",
        C=C,
        M=M,
        kernel_shape=[k, k],
        pads=[p] * 4,
        bits=bits,
        group_size=G,
    )
    inits = [numpy_helper.from_array(a, n) for a, n in ((Q, "Q"), (Sc, "S"), (Z, "Z"), (B, "B"))]
    return _model(node, inits, C, M, S)


def qlinear(model: onnx.ModelProto) -> onnx.ModelProto:
    """quantize_static of the fp32 model: QLinearConv, per-channel int8 weights, uint8 activations."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(3)
            self.feeds = iter([{"X": rng.standard_normal(shape).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        onnx.save(model, src)
        quantize_static(
            src,
            dst,
            Reader(),
            quant_format=QuantFormat.QOperator,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        return onnx.load(dst)


COLUMNS = [
    ("lowbit 4b G32", lambda C, M, S, k: lowbit(C, M, S, k, 4, 32)),
    ("lowbit 4b G128", lambda C, M, S, k: lowbit(C, M, S, k, 4, 128)),
    ("lowbit 2b G128", lambda C, M, S, k: lowbit(C, M, S, k, 2, 128)),
    ("int8 QLinearConv", lambda C, M, S, k: qlinear(dense(C, M, S, k))),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", nargs="+", default=LAYERS, help="C:M:S:k of the layer")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--stat", choices=("median", "min"), default="median", help="min: for a loaded machine")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    args = ap.parse_args()
    names = [c[0] for c in COLUMNS]
    rows = [
        "| layer C->M @S kxk | threads | fp32 Conv ms | " + " | ".join(f"{n} ms (x)" for n in names) + " |",
        "|---" * (3 + len(names)) + "|",
    ]
    for layer in args.layers:
        C, M, S, k = (int(v) for v in layer.split(":"))
        models = [dense(C, M, S, k)] + [make(C, M, S, k) for _, make in COLUMNS]
        for threads in args.threads:
            base, *rest = median_times(models, threads, rounds=args.rounds, stat=args.stat)
            cells = " | ".join(f"{t:.3f} ({base / t:.2f}x)" for t in rest)
            rows.append(f"| {C}->{M} @{S} {k}x{k} | {threads} | {base:.3f} | {cells} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
