"""Whole models pruned by `prune`, with the sparse kernels where each layer is timed faster: latency against
the original at 1 and 2 threads.

- Fashion-MNIST classifier, pruned to the metric budget (top-1 at most 0.5 points below the original on the
  10,000 test images, planned with --max-error 0.1): the sparsities the budget allows, re-fitted.
  Once more with `prune.objective=latency` (energy-aware: only levels that run faster are offered, and the
  budget goes by error per millisecond saved).
- ResNet-18-shaped (models/cnn.py, 224x224, random weights: a speed test only, accuracy means nothing) with
  every Conv and the FC at a fixed 70% and 90% sparsity by magnitude, no re-fit.

The pass decides per layer between SparseGemm/SparseConv and the dense pruned op by timing both at the
row's thread count (prune_sparse.py; `onnxopt optimize --threads N`), so each row is its own
optimization. Latency: whole model, batch 1, A/B interleaved in one process, medians of 3 interleaved
measurements (onnxopt.bench.latency); ratio = original / pruned.

Run from the repo root after scripts/setup.sh:
    .venv/bin/python benchmarks/prune_models.py [--quick] [--only fashion]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import cnn, fashion_mnist  # noqa: E402
from onnxopt import make_session  # noqa: E402
from onnxopt.bench import latency  # noqa: E402
from onnxopt.budget import MetricBudget, OutputBudget  # noqa: E402
from onnxopt.data import load_npz, synthetic_inputs  # noqa: E402
from onnxopt.manager import optimize  # noqa: E402
from onnxopt.passes import make_passes  # noqa: E402

PASSES = 3
HEADER = [
    "model",
    "setting",
    "threads",
    "layers sparse / dense-pruned",
    "weights removed",
    "original ms",
    "pruned ms",
    "speedup",
    "accuracy",
]


def cases(quick: bool) -> list[dict]:
    fm = onnx.load(str(ROOT / "models" / "fashion_mnist.onnx"))
    calib = fashion_mnist.write_calibration(ROOT / "models" / "data" / "bench" / "fmnist.npz", n=256)
    fm_feeds = load_npz(calib, fm)
    out = [
        {
            "name": "Fashion-MNIST",
            "setting": "budget: top-1 drop <= 0.5",
            "model": fm,
            "feeds": fm_feeds,
            "budget": lambda m: MetricBudget(m, fashion_mnist.top1, 0.5, name="top-1"),
            "max_error": 0.1,
            "settings": {},
            "metric": lambda s: f"top-1 {fashion_mnist.top1(s):.2f}",
        }
    ]
    out.append({**out[0], "setting": "same, prune.objective=latency", "settings": {"objective": "latency"}})
    resnet = cnn.resnet18()
    feeds = synthetic_inputs(resnet, samples=4, seed=0)
    for sparsity in (0.7,) if quick else (0.7, 0.9):
        out.append(
            {
                "name": "ResNet-18-shaped 224",
                "setting": f"{sparsity:.0%} every layer, magnitude",
                "model": resnet,
                "feeds": feeds,
                "budget": lambda m, f=feeds: OutputBudget(m, f, 1e3),
                "max_error": 1e3,
                "settings": {"sparsity": str(sparsity), "reconstruct": "0", "saliency": "magnitude"},
                "metric": lambda s: "- (random weights)",
            }
        )
    return out


def _removed(records) -> str:
    applied = [r for r in records if r.status == "applied"]
    before = sum(np.prod(r.detail["shape"]) for r in applied)
    kept = sum(r.detail["nnz"] for r in applied)
    return f"{1 - kept / max(before, 1):.1%}"


def rows(quick: bool, only: str | None = None) -> list[list[str]]:
    out = []
    for case in cases(quick):
        if only and not case["name"].lower().startswith(only.lower()):
            continue
        for threads in (1, 2):  # the pass times dense against sparse at the thread count it optimizes for
            t0 = time.perf_counter()
            model = case["model"]
            result = optimize(
                model,
                make_passes(["prune"]),
                case["feeds"],
                case["budget"](model),
                case["max_error"],
                settings={"prune": case["settings"]},
                threads=threads,
            )
            applied = [r for r in result.records if r.status == "applied"]
            sparse = sum(r.detail.get("emitted") == "sparse" for r in applied)
            runs = [
                latency([model, result.model], case["feeds"], threads=threads, rounds=20)
                for _ in range(PASSES)
            ]
            before = float(np.median([r[0]["median_ms"] for r in runs]))
            after = float(np.median([r[1]["median_ms"] for r in runs]))
            out.append(
                [
                    case["name"],
                    case["setting"],
                    str(threads),
                    f"{sparse} / {len(applied) - sparse}",
                    _removed(result.records),
                    f"{before:.2f}",
                    f"{after:.2f}",
                    f"{before / after:.2f}x",
                    case["metric"](make_session(result.model.SerializeToString())),
                ]
            )
            print(" | ".join(out[-1]), f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ResNet at 70% only")
    ap.add_argument("--only", help="rows of the models whose name starts with this (fashion, resnet)")
    args = ap.parse_args()
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(args.quick, args.only)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
