"""CirculantMatMul against onnxruntime's dense MatMul: an FC layer of 4096 x 4096 at batch 1 and 32.

Ratios are dense time / circulant time, measured in one process with onnxopt.timing.median_times
(interleaved, cache flushed between runs, spinning off), at 1 and 2 threads. The issue's goals at batch 1:
full circulant >= 20x, block 64 >= 8x. Batch 32 shows where the dense GEMM (compute-bound there) catches up.

Run from the repo root after scripts/setup.sh:  .venv/bin/python benchmarks/circulant.py
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


def circulant_model(batch: int, b: int) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    C = (rng.standard_normal((K // b, N // b, b)) / 64).astype(np.float32)
    S = rng.choice(np.array([-1.0, 1.0], np.float32), K)
    graph = helper.make_graph(
        [helper.make_node("CirculantMatMul", ["X", "C", "S"], ["Y"], domain="onnxopt", block=b)],
        "circulant",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, N])],
        [numpy_helper.from_array(C, "C"), numpy_helper.from_array(S, "S")],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnxopt", 1)], ir_version=10
    )


def main() -> None:
    rows = [
        "| batch | threads | dense MatMul ms | full circulant ms (x) | block 64 ms (x) |",
        "|---|---|---|---|---|",
    ]
    for batch in (1, 32):
        models = [dense_model(batch), circulant_model(batch, K), circulant_model(batch, 64)]
        for threads in (1, 2):
            d, full, b64 = median_times(models, threads)
            cells = f"{d:.3f} | {full:.3f} ({d / full:.1f}x) | {b64:.3f} ({d / b64:.1f}x)"
            rows.append(f"| {batch} | {threads} | {cells} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
