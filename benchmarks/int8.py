"""int8 on the real models: accuracy and latency of fp32, onnxruntime's plain quantize_static, and onnxopt's
int8 with per-layer accuracy control.

- plain: `quantize_static(model, out, reader)` with every default (QDQ, per-tensor int8 weights and
  activations, MinMax), what a user would pick instead; fed the same calibration samples.
- int8: `onnxopt optimize --methods int8` (static, per-channel int8 weights, uint8 activations on
  Conv/Gemm/MatMul, MinMax or percentile ranges: whichever is closer to fp32), under a metric budget. The
  budget's metric is measured on data kept apart from the reported one (Fashion-MNIST: 2,000 training
  images; OCR: other rendered lines and pages), so the layers kept in fp32 are not chosen on the test data.
  On Fashion-MNIST also `--methods lowrank,int8`.
- The recognizer is calibrated on 32 lines at their own widths (320 to ~750 px), one sample at a time.

Latency: whole models in onnxruntime, A/B interleaved in one process (onnxopt.bench.latency), median of up
to 40 rounds, batch 1, at 1 and 2 threads; every timing holds /tmp/onnxopt-bench.lock so that other
benchmarks on this machine do not run at the same time.

Run from the repo root after scripts/setup.sh:
    .venv/bin/python benchmarks/int8.py [--models fmnist rec det] [--save DIR]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import fashion_mnist, ocr  # noqa: E402
from onnxopt.bench import latency  # noqa: E402
from onnxopt.budget import MetricBudget  # noqa: E402
from onnxopt.errors import BudgetError  # noqa: E402
from onnxopt.graph import normalize  # noqa: E402
from onnxopt.library import session_for  # noqa: E402
from onnxopt.manager import optimize  # noqa: E402
from onnxopt.passes import make_passes  # noqa: E402
from onnxopt.passes.int8_quantize import SampleReader, split_samples  # noqa: E402

LOCK = "/tmp/onnxopt-bench.lock"


def _fm_held_out(session) -> float:
    """Top-1 (percent) on the last 2,000 training images: the budget's metric, apart from the test set."""
    x, y = fashion_mnist.load_train()
    x, y = x[-2000:], y[-2000:]
    name = session.get_inputs()[0].name
    hits = sum(
        int((session.run(None, {name: x[i : i + 500]})[0].argmax(1) == y[i : i + 500]).sum())
        for i in range(0, 2000, 500)
    )
    return 100.0 * hits / len(x)


def cases() -> dict[str, dict]:
    """Per model: path, calibration samples, the budget's metric and drop, the reported metric."""
    paths = ocr.fetch()
    fm_x = np.load(fashion_mnist.write_calibration(ROOT / "models/data/bench/fmnist.npz", n=256))["input"]
    lines = ocr.render_lines(32, seed=1000, min_words=1, max_words=4)
    det_x = np.load(ocr.write_det_calibration(ROOT / "models/data/bench/det.npz", n=4))["x"]
    return {
        "fmnist": dict(
            path=ROOT / "models/fashion_mnist.onnx",
            samples=split_samples({"input": fm_x}),
            budget=(_fm_held_out, (0.3, 0.05), "held-out top-1 %"),
            methods=[("int8",), ("lowrank", "int8")],
            report=("top-1 %", lambda s: fashion_mnist.top1(s), True),
            x={"input": fm_x[:1]},
        ),
        "rec": dict(
            path=paths["rec"],
            samples=[{"x": ocr.rec_batch([im])} for _, im in lines],
            budget=(lambda s: -ocr.cer(s, n=200, seed=7), (0.3, 0.1), "-CER % on 200 other lines"),
            report=("CER %", lambda s: ocr.cer(s, n=200, seed=0), False),
            x={"x": ocr.rec_batch([lines[0][1]], width=320)},
        ),
        "det": dict(
            path=paths["det"],
            samples=split_samples({"x": det_x}),
            budget=(lambda s: ocr.det_iou(s, n=6, seed=7), (1.0,), "box IoU % on 6 other pages"),
            report=("box IoU %", lambda s: ocr.det_iou(s, n=8, seed=0), True),
            x={"x": det_x[:1]},
        ),
    }


@contextmanager
def bench_lock():
    with open(LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def plain(path: Path, samples: list[dict]) -> onnx.ModelProto:
    """onnxruntime's quantize_static with its defaults, on the same calibration samples."""
    from onnxruntime.quantization import quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plain.onnx"
        quantize_static(str(path), str(out), SampleReader(samples))
        return onnx.load(str(out))


def ours(
    model: onnx.ModelProto, samples: list[dict], budget: MetricBudget, methods: tuple[str, ...] = ("int8",)
) -> tuple[onnx.ModelProto, str]:
    """`methods` under `budget`; int8 calibrated on `samples`, one at a time. The per-node methods before it
    fit on the samples stacked (they need equal shapes)."""
    try:
        feeds = {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}
    except ValueError:  # differing shapes: the budget is a metric, feeds only seed the per-node passes
        feeds = dict(samples[0])
    try:
        result = optimize(model, make_passes(list(methods)), feeds, budget, calibrated=True, samples=samples)
    except BudgetError as e:
        return model, f"undone: {e}"
    recs = [r for r in result.records if r.method == "int8"]
    kept = [r.node for r in recs if r.status != "applied"]
    how = f"{len(recs) - len(kept)}/{len(recs)} layers int8"
    if kept:
        how += f"; fp32: {', '.join(kept[:6])}" + (f" and {len(kept) - 6} more" if len(kept) > 6 else "")
    other = [r for r in result.records if r.method != "int8" and r.status == "applied"]
    if other:
        how = f"{len(other)} {other[0].method} rewrites, then {how}"
    return result.model, how


def run(name: str, case: dict, save: Path | None = None) -> list[list[str]]:
    model = onnx.load(str(case["path"]))
    normalize(model)
    fn, drops, what = case["budget"]
    variants = [("fp32", model, "-"), ("plain quantize_static", plain(case["path"], case["samples"]), "all")]
    for methods in case.get("methods", [("int8",)]):
        for drop in drops:
            t0 = time.time()
            q, how = ours(model, case["samples"], MetricBudget(model, fn, drop, name=what), methods)
            note = f"{how} (budget: {what} drop <= {drop:g}; chosen in {time.time() - t0:.0f} s)"
            variants.append((f"onnxopt {'+'.join(methods)}, drop <= {drop:g}", q, note))
    label, metric, higher = case["report"]
    scores = [metric(session_for(m)) for _, m, _ in variants]
    if save:  # for re-timing alone: onnxopt bench SAVE/<model>_fp32.onnx --vs SAVE/<model>_<i>.onnx
        save.mkdir(parents=True, exist_ok=True)
        for i, (_, m, _) in enumerate(variants):
            onnx.save(m, str(save / f"{name}_{'fp32' if i == 0 else i}.onnx"))
        np.savez(save / f"{name}_x.npz", **case["x"])
    with bench_lock():
        lat = {t: latency([m for _, m, _ in variants], case["x"], threads=t, rounds=40) for t in (1, 2)}
    rows = []
    for i, (variant, m, note) in enumerate(variants):
        loss = (scores[0] - scores[i]) if higher else (scores[i] - scores[0])
        timing = [
            f"{lat[t][i]['median_ms']:.2f} ({lat[t][0]['median_ms'] / lat[t][i]['median_ms']:.2f}x)"
            for t in (1, 2)
        ]
        rows.append(
            [
                name,
                variant,
                f"{scores[i]:.2f} {label}",
                f"{loss:+.2f}",
                *timing,
                f"{m.ByteSize() / 1e6:.2f}",
                note,
            ]
        )
    return rows


HEADER = [
    "model",
    "variant",
    "metric",
    "loss vs fp32",
    "ms 1 thread (x fp32)",
    "ms 2 threads (x fp32)",
    "MB",
    "notes",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["fmnist", "rec", "det"], choices=["fmnist", "rec", "det"])
    ap.add_argument("--save", type=Path, help="also write every variant's model here (for re-timing)")
    args = ap.parse_args()
    all_cases = cases()
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for name in args.models:
        for row in run(name, all_cases[name], args.save):
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
