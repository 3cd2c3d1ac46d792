"""SparseGemm and SparseConv (the `prune` method's kernels) against onnxruntime's dense MatMul and Conv.

Each layer's weight is pruned at random (seeded, unstructured) to 70%, 90% and 95% sparsity; the sparse op
runs the kept weights, onnxruntime's dense op (ORT_ENABLE_ALL) the full weight of the same shape. One-node
models, A/B interleaved in one process, a 64 MiB buffer touched before every run, median of --rounds runs
(onnxopt.timing.median_times), at 1 and 2 threads; ratio = dense ms / sparse ms (> 1: the sparse op is
faster). Each figure is the median of --passes sweeps over the whole table, spread out in time: this shared
machine has slow phases of seconds to minutes. The issue's goals: FC 4096 x 4096 batch 1 >= 1.5x at 70%,
3x at 90%, 5x at 95%; 1x1 conv >= 1.3x at 70%, 2x at 90%; 3x3 conv 128@28x28 >= 1.5x at 90%.

Run from the repo root after scripts/setup.sh:  .venv/bin/python benchmarks/prune.py [--rounds 15]
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

from benchmarks.fc import K, N, dense_model  # noqa: E402
from onnxopt import DOMAIN  # noqa: E402
from onnxopt.reference.prune import to_csr  # noqa: E402
from onnxopt.timing import median_times  # noqa: E402

SPARSITIES = (0.7, 0.9, 0.95)
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]


def prune(W: np.ndarray, sparsity: float, seed: int) -> np.ndarray:
    """W with a random `sparsity` fraction of its entries zeroed (unstructured, seeded)."""
    keep = np.random.default_rng(seed).random(W.shape) >= sparsity
    return W * keep


def _model(node: onnx.NodeProto, x_shape: list[int], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "layer",
        [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=10)


def _csr_inits(rows: np.ndarray) -> list[onnx.TensorProto]:
    values, indices, row_ptr = to_csr(rows)
    return [
        numpy_helper.from_array(values, "values"),
        numpy_helper.from_array(indices, "indices"),
        numpy_helper.from_array(row_ptr, "row_ptr"),
    ]


def fc_models(batch: int) -> list[onnx.ModelProto]:
    """Dense MatMul (benchmarks/fc.py's weight), then SparseGemm of that weight pruned to each sparsity."""
    dense = dense_model(batch)
    W = numpy_helper.to_array(dense.graph.initializer[0])
    models = [dense]
    for s in SPARSITIES:
        node = helper.make_node(
            "SparseGemm", ["X", "values", "indices", "row_ptr"], ["Y"], domain=DOMAIN, K=K
        )
        models.append(_model(node, [batch, K], _csr_inits(prune(W, s, 1).T)))
    return models


def conv_models(c: int, m: int, hw: int, k: int) -> list[onnx.ModelProto]:
    """Dense Conv c -> m, k x k (pad k // 2) at hw x hw, batch 1, then SparseConv of each pruned weight."""
    rng = np.random.default_rng(c * 1000 + m)
    W = (rng.standard_normal((m, c, k, k)) * np.sqrt(2 / (c * k * k))).astype(np.float32)
    B = rng.standard_normal(m).astype(np.float32)
    pads = [k // 2] * 4
    x_shape = [1, c, hw, hw]
    dense = helper.make_node("Conv", ["X", "W", "B"], ["Y"], pads=pads, kernel_shape=[k, k])
    models = [_model(dense, x_shape, [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")])]
    for s in SPARSITIES:
        node = helper.make_node(
            "SparseConv",
            ["X", "values", "indices", "row_ptr", "B"],
            ["Y"],
            domain=DOMAIN,
            C=c,
            kernel_shape=[k, k],
            pads=pads,
        )
        inits = [*_csr_inits(prune(W, s, 2).reshape(m, -1)), numpy_helper.from_array(B, "B")]
        models.append(_model(node, x_shape, inits))
    return models


LAYERS = [  # (label, batch, models factory)
    (f"FC {K}x{N}", 1, lambda: fc_models(1)),
    (f"FC {K}x{N}", 32, lambda: fc_models(32)),
    ("1x1 conv 256->64 @56x56", 1, lambda: conv_models(256, 64, 56, 1)),
    ("1x1 conv 64->256 @56x56", 1, lambda: conv_models(64, 256, 56, 1)),
    ("1x1 conv 512->512 @14x14", 1, lambda: conv_models(512, 512, 14, 1)),
    ("3x3 conv 128->128 @28x28", 1, lambda: conv_models(128, 128, 28, 3)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--only", help="substring of the layer labels to run")
    args = ap.parse_args()
    layers = [(label, batch, f()) for label, batch, f in LAYERS if not args.only or args.only in label]
    times: dict[tuple[int, int], list[list[float]]] = {}
    for _ in range(args.passes):
        for i, (_, _, models) in enumerate(layers):
            for threads in (1, 2):
                times.setdefault((i, threads), []).append(median_times(models, threads, args.rounds))
    head = " | ".join(f"{round(s * 100)}% sparse ms (x)" for s in SPARSITIES)
    rows = [f"| layer | batch | threads | dense ms | {head} |", "|---" * (4 + len(SPARSITIES)) + "|"]
    for i, (label, batch, _) in enumerate(layers):
        for threads in (1, 2):
            dense, *sparse = np.median(np.array(times[i, threads]), axis=0)
            cells = " | ".join(f"{t:.3f} ({dense / t:.2f}x)" for t in sparse)
            rows.append(f"| {label} | {batch} | {threads} | {dense:.3f} | {cells} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
