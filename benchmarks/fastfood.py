"""FastfoodMatMul against onnxruntime's dense MatMul: an FC layer of 4096 x 4096 at batch 1 and 32.

Ratios are dense time / Fastfood time, measured in one process with onnxopt.timing.median_times
(interleaved, cache flushed between runs, spinning off), at 1 and 2 threads, for stacks of depth 1 and 4
(the pass's shallowest and deepest). The issue's goal at batch 1: Fastfood >= 10x. Batch 32 shows where the
dense GEMM (compute-bound there) catches up.

Run from the repo root after scripts/setup.sh:  .venv/bin/python benchmarks/fastfood.py
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


def fastfood_model(batch: int, d: int) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    n = K
    B = rng.choice(np.array([-1.0, 1.0], np.float32), (d, n))
    G = rng.standard_normal((d, n)).astype(np.float32)
    S = (rng.standard_normal((d, n)) / n).astype(np.float32)
    P = np.stack([rng.permutation(n) for _ in range(d)]).astype(np.int64)
    inits = [numpy_helper.from_array(a, name) for a, name in zip((B, G, S, P), "BGSP", strict=True)]
    node = helper.make_node(
        "FastfoodMatMul", ["X", *"BGSP"], ["Y"], domain="onnxopt", in_features=K, out_features=N
    )
    graph = helper.make_graph(
        [node],
        "fastfood",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, N])],
        inits,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("onnxopt", 1)], ir_version=10
    )


def main() -> None:
    rows = [
        "| batch | threads | dense MatMul ms | Fastfood depth 1 ms (x) | Fastfood depth 4 ms (x) |",
        "|---|---|---|---|---|",
    ]
    for batch in (1, 32):
        models = [dense_model(batch), fastfood_model(batch, 1), fastfood_model(batch, 4)]
        for threads in (1, 2):
            d, f1, f4 = median_times(models, threads)
            cells = f"{d:.3f} | {f1:.4f} ({d / f1:.0f}x) | {f4:.4f} ({d / f4:.0f}x)"
            rows.append(f"| {batch} | {threads} | {cells} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
