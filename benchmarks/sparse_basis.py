"""sparse_basis on real models: Conv weights, bytes and FLOPs kept against accuracy, beside `prune` on the
same Convs, and the speed of each emitted pair (basis Conv + SparseConv/1x1) against the original Conv.

Fashion-MNIST classifier (models/fashion_mnist.onnx, 256 calibration images from the training set, top-1 on
the 10,000 test images) and, with --models ocr, the PP-OCRv4 recognizer (32 rendered calibration lines,
character error rate on 200 other lines). Each row is one optimization with the task metric as the budget
(the CLI's `--eval ... --max-drop D`), planned with --max-error 0.1, at the default drop (0.5 points) and a
looser one. `prune` runs on the same layers (`prune.layers=conv`, its sparse kernels off: `prune.sparse=0`,
so its bytes are the dense pruned weight's and its size is counted as its nonzeros).

"kept" = after / before over all group-1 Convs of the model with constant weights (rewritten or not):
weights (sparse_basis: basis + nonzeros of S; prune: nonzeros), bytes of what is emitted (sparse_basis:
basis + CSR of S or dense 1x1; prune: dense pruned weight) and FLOPs of what is emitted.

Speed: every Conv the budget rewrote, cut out as a one-node model (batch 1, its shape in the model) and timed
A/B against its rewrite in one process, cache flushed, medians (onnxopt.timing), at 1 and 2 threads; then the
whole model at batch 1 (onnxopt.bench.latency, medians of 3 interleaved runs).

Run from the repo root after scripts/setup.sh (times: under flock /tmp/onnxopt-bench.lock):
    .venv/bin/python benchmarks/sparse_basis.py [--models fmnist ocr] [--drops 0.5 2.0] [--set form=shared]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx
import onnx_graphsurgeon as gs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import fashion_mnist, ocr  # noqa: E402
from onnxopt import make_session  # noqa: E402
from onnxopt.analysis import tensor_shapes  # noqa: E402
from onnxopt.bench import latency  # noqa: E402
from onnxopt.budget import MetricBudget  # noqa: E402
from onnxopt.data import load_npz  # noqa: E402
from onnxopt.errors import BudgetError  # noqa: E402
from onnxopt.manager import optimize  # noqa: E402
from onnxopt.passes import make_passes  # noqa: E402
from onnxopt.timing import median_times  # noqa: E402

BENCH = ROOT / "models" / "data" / "bench"
SETTINGS = {"sparse_basis": {}, "prune": {"layers": "conv", "sparse": "0"}}


@contextlib.contextmanager
def bench_lock():
    """Hold /tmp/onnxopt-bench.lock while timing (only then: the planning runs beside others' timings)."""
    with open("/tmp/onnxopt-bench.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fmnist_case() -> dict:
    model = onnx.load(str(ROOT / "models" / "fashion_mnist.onnx"))
    return {
        "name": "Fashion-MNIST",
        "model": model,
        "feeds": load_npz(fashion_mnist.write_calibration(BENCH / "fmnist.npz", n=256), model),
        "metric": ("top-1 %", fashion_mnist.top1, fashion_mnist.top1, "models.fashion_mnist:top1"),
    }


def ocr_case() -> dict:
    model = onnx.load(str(ocr.fetch()["rec"]))
    return {
        "name": "PP-OCRv4 rec",
        "model": model,
        "feeds": load_npz(ocr.write_calibration(BENCH / "rec32.npz", n=32), model),
        "metric": ("CER %", ocr.cer, ocr.score, "models.ocr:score"),
    }


def kept(model: onnx.ModelProto, records) -> dict[str, float]:
    """after / before of weights, bytes and FLOPs over every group-1 Conv of `model` with a constant weight
    (batch 1 FLOPs; a rewritten node's FLOPs scaled by its record's after / before)."""
    shapes = tensor_shapes(model)
    applied = {r.node: r for r in records if r.status == "applied" and r.op_type == "Conv"}
    inits = {t.name: t for t in model.graph.initializer}
    before = {"params": 0, "bytes": 0, "flops": 0}
    after = dict(before)
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type != "Conv" or group != 1 or node.input[1] not in inits:
            continue
        params = sum(int(np.prod(inits[t].dims)) for t in node.input[1:] if t in inits)
        flops = 2 * int(np.prod(shapes[node.output[0]])) * int(np.prod(inits[node.input[1]].dims[1:]))
        cost = {"params": params, "bytes": 4 * params, "flops": flops}
        r = applied.get(node.name)
        for k in before:
            before[k] += cost[k]
            if r is None:
                after[k] += cost[k]
            elif k == "flops":
                after[k] += cost[k] * r.flops_after / max(r.flops_before, 1)
            else:
                after[k] += getattr(r, f"{k}_after")
    return {k: after[k] / max(before[k], 1) for k in before}


def layer_speed(original: onnx.ModelProto, optimized: onnx.ModelProto, records, threads: int) -> list[str]:
    """Per rewritten Conv: ms of the original node and of its emitted nodes, cut out and timed A/B."""
    shapes = _shapes(original)
    out = []
    for r in (r for r in records if r.status == "applied" and r.op_type == "Conv"):
        before = _cut(original, [r.node], shapes)
        after = _cut(optimized, r.new_nodes, shapes)  # its input is the original node's
        base, new = median_times([before, after], threads)
        d = r.detail
        if "form" in d:  # sparse_basis: B filters (shared) or q kernels per input channel (channel)
            size = f"{'B' if d['form'] == 'shared' else 'q'}={d['basis']}"
            shape = f"{d['form']} {size} nnz={d['nnz']} {d['emitted']}"
        else:
            shape = f"{d.get('sparsity', 0):.0%}"
        out.append(f"{r.node} ({shape}): {base:.3f} -> {new:.3f} ms ({base / new:.2f}x)")
    return out


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    vis = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {
        v.name: [d.dim_value if d.dim_value > 0 else 1 for d in v.type.tensor_type.shape.dim] for v in vis
    }


def _cut(model: onnx.ModelProto, names: list[str], shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """The nodes `names` (a chain) alone, batch 1, their first input the graph input."""
    graph = gs.import_onnx(model)
    nodes = [n for n in graph.nodes if n.name in names]
    produced = {t.name for n in nodes for t in n.outputs}
    x = next(t for n in nodes for t in n.inputs if isinstance(t, gs.Variable) and t.name not in produced)
    x.shape, x.dtype = [1, *shapes[x.name][1:]], np.float32
    y = nodes[-1].outputs[0]
    y.dtype = np.float32
    graph.inputs, graph.outputs = [x], [y]
    graph.nodes = nodes
    graph.cleanup().toposort()
    cut = gs.export_onnx(graph)
    del cut.opset_import[:]
    cut.opset_import.extend(model.opset_import)
    return cut


def run(case: dict, method: str, drop: float, threads: tuple[int, ...]) -> list[str]:
    model, feeds = case["model"], case["feeds"]
    _, show, metric, spec = case["metric"]
    t0 = time.perf_counter()
    try:
        result = optimize(
            model,
            make_passes([method]),
            feeds,
            MetricBudget(model, metric, drop, name=spec),
            0.1,
            settings={method: SETTINGS[method]},
        )
    except BudgetError as e:
        return [f"| {method} | {drop} | nothing fits ({e}) | | | | | |"]
    seconds = time.perf_counter() - t0
    k = kept(model, result.records)
    applied = [r for r in result.records if r.status == "applied" and r.op_type == "Conv"]
    score = show(make_session(result.model.SerializeToString()))
    ms, lines = [], []
    with bench_lock():
        for t in threads:
            runs = [latency([model, result.model], feeds, threads=t, rounds=20) for _ in range(3)]
            before = float(np.median([r[0]["median_ms"] for r in runs]))
            after = float(np.median([r[1]["median_ms"] for r in runs]))
            ms.append(f"{before / after:.2f}x")
        for t in threads:
            for line in layer_speed(model, result.model, result.records, t):
                lines.append(f"  - {t} thread(s): {line}")
    row = (
        f"| {method} | {drop} | {len(applied)} | {100 * k['params']:.1f}% | {100 * k['bytes']:.1f}% | "
        f"{100 * k['flops']:.1f}% | {score:.2f} | {' / '.join(ms)} | {seconds:.0f} |"
    )
    print(row, *lines, sep="\n", file=sys.stderr, flush=True)
    return [row, *lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["fmnist", "ocr"], default=["fmnist"])
    parser.add_argument("--drops", nargs="+", type=float, default=[0.5, 2.0])
    parser.add_argument("--methods", nargs="+", default=["sparse_basis", "prune"])
    parser.add_argument("--set", nargs="*", default=[], help="sparse_basis settings, e.g. form=shared")
    args = parser.parse_args(argv)
    SETTINGS["sparse_basis"] = dict(kv.split("=", 1) for kv in args.set)
    out = []
    for name in args.models:
        case = {"fmnist": fmnist_case, "ocr": ocr_case}[name]()
        label, show, _, spec = case["metric"]
        base = show(make_session(case["model"].SerializeToString()))
        head = ["method", "max drop", "Convs rewritten", "weights kept", "bytes kept", "FLOPs kept"]
        head += [label, "model speedup 1 / 2 threads", "plan s"]
        out += [f"### {case['name']} (original {label} {base:.2f}; --eval {spec})", ""]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        details = []
        for drop in args.drops:
            for method in args.methods:
                row, *layers = run(case, method, drop, (1, 2))
                out.append(row)
                details += [f"{method}, max drop {drop}:", *layers] if layers else []
        out += ["", *details, ""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
