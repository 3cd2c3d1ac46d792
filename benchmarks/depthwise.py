"""DepthwiseConv against onnxruntime's own depthwise Conv (group = C, ORT_ENABLE_ALL) on single 3x3 layers.

A depthwise 3x3 layer does 9 multiply-adds per output, Y[n, c, y, x] = B[c] + sum_{i,j} W[c, i, j]
Xp[n, c, s y + i, s x + j], so it is bound by loads and memory traffic rather than arithmetic. The shapes are
MobileNetV2's depthwise layers, batch 1, pads 1. Each pair of one-node models runs A/B interleaved in one
process with a 64 MiB buffer touched before every run (onnxopt.timing.median_times); the table gives the
median ms and the ratio ORT / DepthwiseConv (> 1: DepthwiseConv is faster).

Run from the repo root after scripts/setup.sh:  .venv/bin/python benchmarks/depthwise.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# numpy's OpenBLAS threads spin after use and would take the second of the two cores from the timed runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxopt import DOMAIN  # noqa: E402
from onnxopt.timing import median_times  # noqa: E402

# (channels, input height = width, stride): MobileNetV2's depthwise 3x3 layers.
SHAPES = [
    (32, 112, 1),
    (96, 56, 1),
    (96, 112, 2),
    (144, 56, 1),
    (144, 56, 2),
    (192, 28, 1),
    (384, 14, 1),
    (960, 7, 1),
]


def layer(channels: int, size: int, stride: int, custom: bool, activation: str = "") -> onnx.ModelProto:
    """One depthwise 3x3 layer with pads 1 at batch 1: onnxruntime's Conv group=C or DepthwiseConv."""
    rng = np.random.default_rng(channels * 1000 + size)
    W = (rng.standard_normal((channels, 1, 3, 3)) / 3).astype(np.float32)
    B = (0.1 * rng.standard_normal(channels)).astype(np.float32)
    attrs: dict = {"pads": [1, 1, 1, 1], "strides": [stride, stride]}
    if custom:
        node = helper.make_node("DepthwiseConv", ["X", "W", "B"], ["Y"], domain=DOMAIN, **attrs)
    else:
        node = helper.make_node("Conv", ["X", "W", "B"], ["Y"], kernel_shape=[3, 3], group=channels, **attrs)
    graph = helper.make_graph(
        [node],
        "depthwise",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def table(rounds: int, threads_list: list[int]) -> str:
    """The markdown table: one row per shape and thread count."""
    lines = [
        "| shape (C@HxW) | stride | threads | ORT Conv ms | DepthwiseConv ms | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for channels, size, stride in SHAPES:
        models = [layer(channels, size, stride, custom=False), layer(channels, size, stride, custom=True)]
        for threads in threads_list:
            ort_ms, dw_ms = median_times(models, threads, rounds)
            lines.append(
                f"| {channels}@{size}x{size} | {stride} | {threads} | {ort_ms:.4f} | {dw_ms:.4f} "
                f"| {ort_ms / dw_ms:.2f}x |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed runs per model (median)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    print(table(args.rounds, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
