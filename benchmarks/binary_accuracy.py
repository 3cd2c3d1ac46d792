"""binary on Fashion-MNIST (conv1 1->64, conv2 64->64, conv3 64->128, conv4 128->256, all 3x3; fc1 1024x1024,
fc2 1024x10): top-1 on the 10,000 test images after post-training binarization (no retraining), per layer set,
mode (partial: binary weights, float activations; full: XNOR-Net, binary weights and activations) and weight
kind (sign: XNOR-Net's alpha sign(W); 01: a b + c, after Kim et al.), with the layers' estimated errors.

Each row is one `optimize` with the binary pass fixed to one mode, weight kind and layer set
(`--set binary.mode=M binary.weights=W binary.layers=L`) under an output budget no setting breaks, so that
every selected layer is rewritten and the row shows what it costs. The last row runs the pass at the default
budget (relative output error 1e-2), which must reject binarization. Calibration: N random training images.

Run from the repo root after scripts/setup.sh:
    .venv/bin/python benchmarks/binary_accuracy.py [--calib 256]
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
from onnxopt.budget import OutputBudget  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=256, help="calibration images from the training set")
    args = ap.parse_args()
    model = onnx.load(str(ROOT / "models" / "fashion_mnist.onnx"))
    feeds = load_npz(fashion_mnist.write_calibration(BENCH / f"fmnist{args.calib}.npz", n=args.calib), model)
    base = fashion_mnist.top1(make_session(model.SerializeToString()))
    rows = [
        "| layers | mode | centred | weights | estimated errors (per layer) | weight bytes after / before "
        "| top-1 % | change |",
        "|---|---|---|---|---|---|---|---|",
        f"| none (fp32) | - | - | - | - | - | {base:.2f} | - |",
    ]
    for layers, mode, centred in RUNS:
        for weights in ("sign", "01"):
            center = "1" if centred else "0"
            settings = {"binary": {"mode": mode, "weights": weights, "layers": layers, "center": center}}
            budget = OutputBudget(model, feeds, FIXED)
            result = optimize(model, make_passes(["binary"]), feeds, budget, FIXED, settings=settings)
            recs = [r for r in result.records if r.status == "applied"]
            errs = ", ".join(f"{r.node} {r.est_error:.3f}" for r in recs)
            after = sum(r.bytes_after for r in recs)
            before = sum(r.bytes_before for r in recs)
            top1 = fashion_mnist.top1(make_session(result.model.SerializeToString()))
            cells = [
                layers,
                mode,
                "yes" if centred else "no",
                weights,
                errs,
                f"{after:,} / {before:,}",
                f"{top1:.2f}",
                f"{top1 - base:+.2f}",
            ]
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], file=sys.stderr, flush=True)
    budget = OutputBudget(model, feeds, 1e-2)
    result = optimize(model, make_passes(["binary"]), feeds, budget, 1e-2)
    applied = [r.node for r in result.records if r.status == "applied"]
    reasons = {r.node: r.reason for r in result.records if r.status != "applied"}
    print("\n".join(rows))
    print(f"\nDefault budget (1e-2): applied {applied or 'none'}; declined:")
    for node, reason in reasons.items():
        print(f"- {node}: {reason}")


if __name__ == "__main__":
    main()
