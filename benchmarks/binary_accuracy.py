"""binary on Fashion-MNIST (conv1 1->64, conv2 64->64, conv3 64->128, conv4 128->256, all 3x3; fc1 1024x1024,
fc2 1024x10): top-1 on the 10,000 test images after post-training binarization (no retraining), per layer set,
mode (partial: binary weights, float activations; full: XNOR-Net, binary weights and activations) and weight
kind (sign: XNOR-Net's alpha sign(W); 01: a b + c, after Kim et al.), with the layers' estimated errors.

Each row is one `optimize` with the binary pass fixed to one mode, weight kind and layer set
(`--set binary.mode=M binary.weights=W binary.layers=L`) under an output budget no setting breaks, so that
every selected layer is rewritten and the row shows what it costs. The second table does the same for k-bit
activations (W1Ak: `binary.act_bits=k`, DoReFa-style codes in a calibrated clipped range) on each layer and
on all of them. The last part runs the pass with its default options (every mode, act_bits 1,2,3,4, both
weight kinds, all layers) under the default budget (relative output error 1e-2) and under top-1 drops of 0.5
and 2 points (onnxopt's --eval models/fashion_mnist.py:top1 --max-drop D, at the CLI's default --max-error
1e-2, which plans only options of estimated error <= 0.08, and at --max-error 1, which plans every option
and leaves the choice to the metric). The metric is the test set's top-1, as the CLI's --eval would use it:
the budget selects on the numbers it reports. Calibration: N random training images.

Run from the repo root after scripts/setup.sh:
    .venv/bin/python benchmarks/binary_accuracy.py [--calib 256] [--only xnor|kbit|budget]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import fashion_mnist  # noqa: E402
from onnxopt import make_session  # noqa: E402
from onnxopt.budget import MetricBudget, OutputBudget  # noqa: E402
from onnxopt.data import load_npz  # noqa: E402
from onnxopt.manager import optimize  # noqa: E402
from onnxopt.passes import make_passes  # noqa: E402

BENCH = ROOT / "models" / "data" / "bench"
FIXED = 1e6  # an output budget no fixed setting breaks
# (layers, mode, centred): Conv layers only run full binarization; conv1 (one input channel) is declined
RUNS = [
    ("fc2", "partial", False),
    ("fc1", "partial", False),
    ("fc", "partial", False),
    ("fc", "full", False),
    ("fc2", "full", True),
    ("fc1", "full", True),
    ("fc", "full", True),
    ("conv4", "full", False),
    ("conv4", "full", True),
    ("conv2", "full", True),
    ("conv2,conv3,conv4", "full", True),
    ("all", "full", True),
]
KBIT_LAYERS = ["fc2", "fc1", "conv4", "conv3", "conv2", "all"]  # conv1 (one input channel) is declined


def _applied(result) -> list:
    return [r for r in result.records if r.status == "applied"]


def _rewrite(model, feeds, settings: dict) -> tuple[list, object]:
    budget = OutputBudget(model, feeds, FIXED)
    result = optimize(model, make_passes(["binary"]), feeds, budget, FIXED, settings=settings)
    return _applied(result), result.model


def xnor_rows(model, feeds, base: float) -> list[str]:
    rows = [
        "| layers | mode | centred | weights | estimated errors (per layer) | weight bytes after / before "
        "| top-1 % | change |",
        "|---|---|---|---|---|---|---|---|",
        f"| none (fp32) | - | - | - | - | - | {base:.2f} | - |",
    ]
    for layers, mode, centred in RUNS:
        for weights in ("sign", "01"):
            center = "1" if centred else "0"
            settings = {
                "binary": {
                    "mode": mode,
                    "weights": weights,
                    "layers": layers,
                    "center": center,
                    "act_bits": "1",
                }
            }
            recs, optimized = _rewrite(model, feeds, settings)
            top1 = fashion_mnist.top1(make_session(optimized.SerializeToString()))
            errs = ", ".join(f"{r.node} {r.est_error:.3f}" for r in recs)
            size = f"{sum(r.bytes_after for r in recs):,} / {sum(r.bytes_before for r in recs):,}"
            cells = [
                layers,
                mode,
                "yes" if centred else "no",
                weights,
                errs,
                size,
                f"{top1:.2f}",
                f"{top1 - base:+.2f}",
            ]
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def kbit_rows(model, feeds, base: float, bits: list[int]) -> list[str]:
    rows = [
        "| layers | activations | weights | estimated errors (per layer) | weight bytes after / before "
        "| top-1 % | change |",
        "|---|---|---|---|---|---|---|",
        f"| none (fp32) | fp32 | fp32 | - | - | {base:.2f} | - |",
    ]
    for layers in KBIT_LAYERS:
        for k in bits:
            for weights in ("sign", "01"):
                settings = {
                    "binary": {"mode": "full", "weights": weights, "layers": layers, "act_bits": str(k)}
                }
                recs, optimized = _rewrite(model, feeds, settings)
                top1 = fashion_mnist.top1(make_session(optimized.SerializeToString()))
                errs = ", ".join(f"{r.node} {r.est_error:.3f}" for r in recs)
                size = f"{sum(r.bytes_after for r in recs):,} / {sum(r.bytes_before for r in recs):,}"
                cells = [layers, f"W1A{k}", weights, errs, size, f"{top1:.2f}", f"{top1 - base:+.2f}"]
                rows.append("| " + " | ".join(cells) + " |")
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def budget_rows(model, feeds, base: float) -> list[str]:
    """What the pass keeps with its default options under the default budget and two top-1 budgets."""
    rows = [
        "| budget | planning --max-error | kept (node: option) | weight bytes after / before | top-1 % "
        "| change |",
        "|---|---|---|---|---|---|",
    ]
    runs = [("output rel. L2 <= 1e-2 (default)", OutputBudget(model, feeds, 1e-2), 1e-2)]
    for drop in (0.5, 2.0):
        metric = MetricBudget(model, fashion_mnist.top1, drop, name="top1")
        runs += [(f"top-1 drop <= {drop:g}", metric, 1e-2), (f"top-1 drop <= {drop:g}", metric, 1.0)]
    for label, budget, max_error in runs:
        result = optimize(model, make_passes(["binary"]), feeds, budget, max_error)
        recs = _applied(result)
        kept = ", ".join(f"{r.node}: {_option(r.detail)}" for r in recs) or "none"
        size = (
            f"{sum(r.bytes_after for r in recs):,} / {sum(r.bytes_before for r in recs):,}" if recs else "-"
        )
        top1 = fashion_mnist.top1(make_session(result.model.SerializeToString()))
        rows.append(f"| {label} | {max_error:g} | {kept} | {size} | {top1:.2f} | {top1 - base:+.2f} |")
        print(rows[-1], file=sys.stderr, flush=True)
        for r in result.records:
            if r.status != "applied":
                print(f"    {r.node} {r.status}: {r.reason}", file=sys.stderr, flush=True)
    return rows


def _option(detail: dict) -> str:
    if detail.get("mode") == "partial":
        return f"W1/fp32 act ({detail['weights']})"
    return f"W1A{detail.get('act_bits', 1)} ({detail['weights']})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=256, help="calibration images from the training set")
    ap.add_argument("--only", choices=["xnor", "kbit", "budget"], help="one part only")
    ap.add_argument("--act-bits", nargs="*", type=int, default=[2, 3, 4])
    args = ap.parse_args()
    model = onnx.load(str(ROOT / "models" / "fashion_mnist.onnx"))
    feeds = load_npz(fashion_mnist.write_calibration(BENCH / f"fmnist{args.calib}.npz", n=args.calib), model)
    base = fashion_mnist.top1(make_session(model.SerializeToString()))
    parts = []
    if args.only in (None, "xnor"):
        parts.append(xnor_rows(model, feeds, base))
    if args.only in (None, "kbit"):
        parts.append(kbit_rows(model, feeds, base, args.act_bits))
    if args.only in (None, "budget"):
        parts.append(budget_rows(model, feeds, base))
    print("\n\n".join("\n".join(rows) for rows in parts))


if __name__ == "__main__":
    main()
