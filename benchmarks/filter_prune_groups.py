"""filter_prune through residual joins, Concat and depthwise Convs (channel groups): FLOPs removed on models
with residuals, with and without the groups (`filter_prune.groups=0`: single Conv -> consumer chains only).

- ResNet-18-shaped (models/cnn.py, 224x224, batch 1, random weights, 8 seeded normal calibration images):
  output budgets (relative L2 of the logits) 1e-2 (the default) and 2e-2. Random weights: accuracy means
  nothing, and the logits of this random network hardly depend on its input (their mean over the 8 images
  is within 2.7% relative L2 of every image's logits), so any budget above ~2.7% lets the re-fit replace
  the network by a near-constant (measured: 2% of the FLOPs left at 0.1); the rows below that show the
  graph the groups allow and its speed. Whole-model latency of
  the original and the pruned model, A/B interleaved in one process (onnxopt.bench.latency), the median
  of 3 measurements, at 1 and 2 threads, under flock /tmp/onnxopt-bench.lock.
- PP-OCRv4 det (rapidocr 1.4.4; 4 rendered 320x320 pages to calibrate): the default budget (output map
  rel. L2 <= 1e-2) and the task metric as the budget (box IoU on 6 other pages at most 1 point down,
  planned with --max-error 0.1); box IoU on 8 pages reported, and latency as above.
- PP-OCRv4 rec (32 rendered lines): the default budget and CER at most 0.5 points up (--max-error 0.1);
  CER on 200 other lines.

FLOPs and parameters are the whole model's (onnxopt.analysis); every output passes onnx.checker (full_check)
and strict shape inference. "pruned" counts the applied candidates as chains / groups.

Run from the repo root after scripts/setup.sh:
    .venv/bin/python benchmarks/filter_prune_groups.py [--models resnet det rec] [--no-latency]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import cnn, ocr  # noqa: E402
from onnxopt import make_session  # noqa: E402
from onnxopt.analysis import node_stats, totals  # noqa: E402
from onnxopt.bench import latency  # noqa: E402
from onnxopt.budget import MetricBudget, OutputBudget  # noqa: E402
from onnxopt.data import load_npz, synthetic_inputs  # noqa: E402
from onnxopt.errors import BudgetError  # noqa: E402
from onnxopt.graph import normalize  # noqa: E402
from onnxopt.manager import optimize  # noqa: E402
from onnxopt.passes import make_passes  # noqa: E402

BENCH = ROOT / "models" / "data" / "bench"
LOCK = "/tmp/onnxopt-bench.lock"
PASSES = 3
HEAD = ["model", "budget", "groups", "pruned", "MFLOPs", "params", "metric", "1 thread", "2 threads", "s"]


@contextmanager
def bench_lock():
    with open(LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def stats(model: onnx.ModelProto, feeds: dict) -> dict[str, int]:
    """Whole-model FLOPs and parameters for one sample (shapes from one run: the OCR inputs are dynamic)."""
    dims = {}
    for x in model.graph.input:
        if x.name in feeds:
            for i, d in enumerate(x.type.tensor_type.shape.dim):
                if d.dim_param:
                    dims[d.dim_param] = 1 if i == 0 else int(feeds[x.name].shape[i])
    return totals(node_stats(model, dims=dims))


def _load(path: Path) -> onnx.ModelProto:
    """The model with its Constant nodes as initializers, so that FLOPs and parameters count them."""
    model = onnx.load(str(path))
    normalize(model)
    return model


def cases(names: list[str]) -> list[dict]:
    out = []
    if "resnet" in names:
        model = cnn.resnet18()
        feeds = synthetic_inputs(model, samples=8, seed=0)
        out.append(
            {
                "name": "ResNet-18-shaped 224 (random weights)",
                "model": model,
                "feeds": feeds,
                "budgets": [(f"logits rel. L2 <= {e:g}", None, e) for e in (1e-2, 2e-2)],
                "metric": None,
            }
        )
    paths = ocr.fetch() if {"det", "rec"} & set(names) else {}
    if "det" in names:
        model = _load(paths["det"])
        out.append(
            {
                "name": "PP-OCRv4 det 320",
                "model": model,
                "feeds": load_npz(ocr.write_det_calibration(BENCH / "det4.npz", n=4), model),
                "budgets": [
                    ("default: output rel. L2 <= 1e-2", None, 1e-2),
                    ("box IoU drop <= 1 (--max-error 0.1)", 1.0, 0.1),
                ],
                "metric": ("box IoU %", lambda s: ocr.det_iou(s, n=8, seed=0)),
                "budget_metric": lambda s: ocr.det_iou(s, n=6, seed=7),
            }
        )
    if "rec" in names:
        model = _load(paths["rec"])
        out.append(
            {
                "name": "PP-OCRv4 rec",
                "model": model,
                "feeds": load_npz(ocr.write_calibration(BENCH / "rec32.npz", n=32), model),
                "budgets": [
                    ("default: output rel. L2 <= 1e-2", None, 1e-2),
                    ("CER rise <= 0.5 (--max-error 0.1)", 0.5, 0.1),
                ],
                "metric": ("CER %", lambda s: ocr.cer(s)),
                "budget_metric": ocr.score,
            }
        )
    return out


def speed(model: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict) -> list[str]:
    cells = []
    for threads in (1, 2):
        with bench_lock():
            runs = [latency([model, pruned], feeds, threads=threads, rounds=20) for _ in range(PASSES)]
        before = float(np.median([r[0]["median_ms"] for r in runs]))
        after = float(np.median([r[1]["median_ms"] for r in runs]))
        cells.append(f"{before:.2f} -> {after:.2f} ms ({before / after:.2f}x)")
    return cells


def row(case: dict, budget_spec, groups: bool, timed: bool, base: dict) -> list[str]:
    label, max_drop, max_error = budget_spec
    model, feeds = case["model"], case["feeds"]
    t = time.perf_counter()
    if max_drop is None:
        budget = OutputBudget(model, feeds, max_error)
    else:
        budget = MetricBudget(model, case["budget_metric"], max_drop, name=case["metric"][0])
    settings = {"filter_prune": {"groups": "1" if groups else "0"}}
    cells = [case["name"], label, "on" if groups else "off"]
    try:
        result = optimize(model, make_passes(["filter_prune"]), feeds, budget, max_error, settings=settings)
    except BudgetError:
        return [*cells, "nothing fits", "", "", "", "", "", f"{time.perf_counter() - t:.0f}"]
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, strict_mode=True)
    applied = [r for r in result.records if r.status == "applied"]
    n_groups = sum("producers" in r.detail for r in applied)
    got = stats(out, feeds)
    metric = "- (random weights)"
    if case["metric"]:
        metric = f"{case['metric'][1](make_session(out.SerializeToString())):.2f}"
    lat = speed(model, out, feeds) if timed and applied else ["", ""]
    return [
        *cells,
        f"{len(applied) - n_groups} / {n_groups}",
        f"{got['flops'] / 1e6:.0f} ({100 * got['flops'] / base['flops']:.0f}%)",
        f"{got['params']:,} ({100 * got['params'] / base['params']:.0f}%)",
        metric,
        *lat,
        f"{time.perf_counter() - t:.0f}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = ["resnet", "det", "rec"]
    parser.add_argument("--models", nargs="+", default=names, choices=names)
    parser.add_argument("--no-latency", action="store_true")
    args = parser.parse_args(argv)
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for case in cases(args.models):
        base = stats(case["model"], case["feeds"])
        metric = "- (random weights)"
        if case["metric"]:
            metric = f"{case['metric'][1](make_session(case['model'].SerializeToString())):.2f}"
        original = [case["name"], "original", "-", "-", f"{base['flops'] / 1e6:.0f}", f"{base['params']:,}"]
        lines.append("| " + " | ".join([*original, metric, "", "", ""]) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
        for spec in case["budgets"]:
            for groups in (True, False):
                lines.append("| " + " | ".join(row(case, spec, groups, not args.no_latency, base)) + " |")
                print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
