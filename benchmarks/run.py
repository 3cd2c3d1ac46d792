"""Benchmarks against stock onnxruntime, written to BENCHMARKS.md.

1. Real models x methods: each model is optimized under the default budget (relative L2 error of every
   output <= 1e-2 on its calibration data), then size, FLOPs and latency are compared with the original in
   the same process (A/B interleaved, median, at 1 and 2 threads) and the task metric is measured.
2. WinogradConv against onnxruntime's Conv (ORT_ENABLE_ALL) on single 3x3 layers, batch 1, interleaved,
   with a 64 MiB buffer touched between runs so neither kernel reads its weights from a warm cache.

Run from the repo root after scripts/setup.sh:  .venv/bin/python benchmarks/run.py [--quick]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import fashion_mnist, ocr  # noqa: E402
from onnxopt import DOMAIN, make_session  # noqa: E402
from onnxopt.analysis import node_stats, totals  # noqa: E402
from onnxopt.bench import latency  # noqa: E402
from onnxopt.budget import OutputBudget  # noqa: E402
from onnxopt.data import dims_from_feeds, load_npz  # noqa: E402
from onnxopt.errors import BudgetError  # noqa: E402
from onnxopt.manager import optimize  # noqa: E402
from onnxopt.passes import make_passes  # noqa: E402

DATA = ROOT / "models" / "data"
FLUSH = np.ones(64 * 2**20 // 8)
MEMORY_SECTION = "## Memory on a large model"


def real_models(quick: bool) -> list[dict]:
    """name, model path, calibration file, metric (label, function, higher_is_better)."""
    paths = ocr.fetch()
    calib = DATA / "bench"
    n = 40 if quick else 200
    return [
        {
            "name": "fashion_mnist",
            "path": ROOT / "models" / "fashion_mnist.onnx",
            "calib": fashion_mnist.write_calibration(calib / "fmnist.npz", n=256),
            "metric": ("top-1 %", lambda s: fashion_mnist.top1(s, n=2000 if quick else None), True),
        },
        {
            "name": "ppocr_rec",
            "path": paths["rec"],
            "calib": ocr.write_calibration(calib / "rec.npz", n=16),
            "metric": ("CER %", lambda s: ocr.cer(s, n=n), False),
        },
        {
            "name": "ppocr_det",
            "path": paths["det"],
            "calib": ocr.write_det_calibration(calib / "det.npz", n=2),
            "metric": ("box IoU %", lambda s: ocr.det_iou(s, n=4 if quick else 8), True),
        },
        {
            "name": "ppocr_cls",
            "path": paths["cls"],
            "calib": ocr.write_cls_calibration(calib / "cls.npz", n=16),
            "metric": ("accuracy %", lambda s: ocr.cls_accuracy(s, n=n), True),
        },
    ]


def model_rows(quick: bool) -> list[list[str]]:
    rows = []
    for spec in real_models(quick):
        model = onnx.load(str(spec["path"]))
        feeds = load_npz(spec["calib"], model)
        label, metric, _ = spec["metric"]
        base_score = metric(make_session(model.SerializeToString()))
        dims = dims_from_feeds(model, feeds)
        before = totals(node_stats(model, dims))
        for method in ("lowrank", "winograd"):
            t0 = time.perf_counter()
            try:
                budget = OutputBudget(model, feeds, 1e-2)
                result = optimize(model, make_passes([method]), feeds, budget, dims=dims)
            except BudgetError as e:
                rows.append([spec["name"], method, "-", "-", "-", "-", f"budget not met: {e}"])
                continue
            secs = time.perf_counter() - t0
            applied = sum(r.status == "applied" for r in result.records)
            if not result.changed:
                rows.append(
                    [
                        spec["name"],
                        method,
                        "1.00x",
                        "1.00x",
                        "1.00x",
                        "1.00x",
                        f"{label} {base_score:.2f} (nothing rewritten)",
                    ]
                )
                continue
            after = totals(node_stats(result.model, dims))
            lat = {
                t: latency([model, result.model], feeds, threads=t, rounds=20 if quick else 60)
                for t in (1, 2)
            }
            score = metric(make_session(result.model.SerializeToString()))
            rows.append(
                [
                    spec["name"],
                    f"{method} ({applied} nodes, {secs:.0f}s)",
                    f"{model.ByteSize() / result.model.ByteSize():.2f}x",
                    f"{before['flops'] / max(after['flops'], 1):.2f}x",
                    *(f"{lat[t][0]['median_ms'] / lat[t][1]['median_ms']:.2f}x" for t in (1, 2)),
                    f"{label} {base_score:.2f} -> {score:.2f}; "
                    f"rel L2 {result.verification['worst_rel_l2']:.1e}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    return rows


def conv_model(c: int, hw: int, winograd: bool) -> bytes:
    rng = np.random.default_rng(c)
    W = (rng.standard_normal((c, c, 3, 3)) * np.sqrt(2 / (9 * c))).astype(np.float32)
    B = rng.standard_normal(c).astype(np.float32)
    node = helper.make_node(
        "WinogradConv" if winograd else "Conv",
        ["x", "W", "B"],
        ["y"],
        pads=[1, 1, 1, 1],
        **({"domain": DOMAIN} if winograd else {"kernel_shape": [3, 3]}),
    )
    g = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, hw, hw])],
        [onnx.numpy_helper.from_array(W, "W"), onnx.numpy_helper.from_array(B, "B")],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(DOMAIN, 1)] if winograd else [])
    return helper.make_model(g, opset_imports=opsets).SerializeToString()


def interleaved(sessions, feed: dict, rounds: int) -> list[float]:
    """Median ms per session; runs alternate and a 64 MiB buffer is touched before each one."""
    times = [[] for _ in sessions]
    for s in sessions:
        s.run(None, feed)
    for _ in range(rounds):
        for s, t in zip(sessions, times, strict=True):
            FLUSH.sum()
            t0 = time.perf_counter()
            s.run(None, feed)
            t.append(time.perf_counter() - t0)
    return [float(np.median(t)) * 1e3 for t in times]


def winograd_rows(quick: bool) -> list[list[str]]:
    rows = []
    for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7)):
        x = {"x": np.random.default_rng(0).standard_normal((1, c, hw, hw)).astype(np.float32)}
        for threads in (1, 2):
            ref, win = (make_session(conv_model(c, hw, w), threads=threads) for w in (False, True))
            t_ref, t_win = interleaved([ref, win], x, 10 if quick else 40)
            y_ref, y_win = ref.run(None, x)[0], win.run(None, x)[0]
            err = np.linalg.norm(y_win - y_ref) / np.linalg.norm(y_ref)
            rows.append(
                [
                    f"{c}@{hw}x{hw}",
                    str(threads),
                    f"{t_ref:.3f}",
                    f"{t_win:.3f}",
                    f"{t_ref / t_win:.2f}x",
                    f"{err:.1e}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    return rows


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and smaller evaluation sets")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    conv = winograd_rows(args.quick)
    models = model_rows(args.quick)
    cmd = "bash scripts/setup.sh && .venv/bin/python benchmarks/run.py" + (" --quick" if args.quick else "")
    text = f"""# Benchmarks

Produced by `{cmd}` on {date.today()} ({platform.machine()}, {platform.processor() or "CPU"},
onnxruntime {__import__("onnxruntime").__version__}). Every ratio is original / optimized measured in the
same process, A/B interleaved, median of many runs; above 1 means onnxopt is better.

## Real models, default budget (relative L2 error of every output <= 1e-2 on calibration data)

Latency is whole-model, batch of the calibration file's first sample, onnxruntime ORT_ENABLE_ALL with the
onnxopt library registered for both models.

{md_table(["model", "method", "size", "FLOPs", "latency 1 thread", "latency 2 threads", "accuracy"], models)}

## WinogradConv F(2x2,3x3) against onnxruntime Conv, 3x3 pad 1, batch 1, cache flushed between runs

{md_table(["layer", "threads", "ORT Conv ms", "WinogradConv ms", "speedup", "rel L2 error"], conv)}
"""
    out = Path(args.out)
    # The memory section comes from benchmarks/memory.py, run separately: keep it.
    old = out.read_text() if out.exists() else ""
    if MEMORY_SECTION in old:
        text += "\n" + old[old.index(MEMORY_SECTION) :]
    out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
