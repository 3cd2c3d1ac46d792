"""ACDCMatMul against onnxruntime's dense MatMul: an FC layer of 4096 x 4096 at batch 1 and 32.

Ratios are dense time / ACDC time, measured in one process with onnxopt.timing.median_times (interleaved,
cache flushed between runs, spinning off), at 1 and 2 threads, for stacks of depth 1, 4 and 8 (n = 4096,
random permutations between layers, a bias). The issue sets no speed goal for ACDC; this reports it. Cost per
row is 2 L DCTs of length 4096 (O(L n log n)) against the dense layer's 16.8M multiply-adds, which at batch 1
is bound by reading the 64 MiB weight.

Run from the repo root after scripts/setup.sh:  .venv/bin/python benchmarks/acdc.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fc import K, N, dense_model  # noqa: E402
from onnxopt.timing import median_times  # noqa: E402

DEPTHS = (1, 4, 8)


def acdc_model(batch: int, depth: int) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = {
        "A": (1 + 0.1 * rng.standard_normal((depth, K))).astype(np.float32),
        "D": (1 + 0.1 * rng.standard_normal((depth, K))).astype(np.float32),
        "P": np.stack([rng.permutation(K) for _ in range(depth)]).astype(np.int64),
        "B": rng.standard_normal(N).astype(np.float32),
    }
    graph = helper.make_graph(
        [helper.make_node("ACDCMatMul", ["X", "A", "D", "P", "B"], ["Y"], domain="onnxopt")],
        "acdc",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, N])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnxopt", 1)], ir_version=10
    )


def main() -> None:
    head = " | ".join(f"depth {d} ms (x)" for d in DEPTHS)
    rows = [f"| batch | threads | dense MatMul ms | {head} |", "|---|---|---|" + "---|" * len(DEPTHS)]
    for batch in (1, 32):
        models = [dense_model(batch), *(acdc_model(batch, d) for d in DEPTHS)]
        for threads in (1, 2):
            dense, *times = median_times(models, threads)
            cells = " | ".join(f"{t:.3f} ({dense / t:.1f}x)" for t in times)
            rows.append(f"| {batch} | {threads} | {dense:.3f} | {cells} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
