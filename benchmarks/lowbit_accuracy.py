"""lowbit on Fashion-MNIST's FC layers (fc1 1024x1024, fc2 1024x10) or its Convs (conv2 64->64, conv3
64->128, conv4 128->256, all 3x3; conv1 has 9 weights per filter, fewer than a group, and is declined): top-1
on the 10,000 test images and the layers' estimated (held-out calibration rows) output error, RTN against GPTQ
rounding at 4, 3 and 2 bits.

Each row is one `optimize` with the lowbit pass fixed to one layer kind, bit width, group size and rounding
(`--set lowbit.layers=fc|conv lowbit.bits=B lowbit.group_size=G lowbit.rounding=R lowbit.measure=0`) under an
output budget no setting breaks, so that every selected layer is rewritten and the row shows what it costs
(not timed: this is accuracy). Calibration: N random training images (never test images); GPTQ's H is built
from half of their rows (Conv: input patches) and the error is estimated on the other half.

Run from the repo root after scripts/setup.sh:
    .venv/bin/python benchmarks/lowbit_accuracy.py [--layers fc|conv] [--calib 1024] [--groups 32 128]
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
FIXED = 10.0  # an output budget no fixed setting breaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=1024, help="calibration images from the training set")
    ap.add_argument("--groups", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--layers", choices=("fc", "conv"), default="fc")
    args = ap.parse_args()
    names = ("fc1", "fc2") if args.layers == "fc" else ("conv2", "conv3", "conv4")
    model = onnx.load(str(ROOT / "models" / "fashion_mnist.onnx"))
    feeds = load_npz(fashion_mnist.write_calibration(BENCH / f"fmnist{args.calib}.npz", n=args.calib), model)
    base = fashion_mnist.top1(make_session(model.SerializeToString()))
    fp32 = {"fc": "FC bytes (fp32 4,239,400)", "conv": "conv2-4 bytes (fp32 1,623,808)"}[args.layers]
    rows = [
        "| bits | group | rounding | "
        + " | ".join(f"{n} est. error" for n in names)
        + f" | {fp32} | top-1 % "
        "| change |",
        "|---" * (6 + len(names)) + "|",
        f"| fp32 | - | - | {'- | ' * len(names)}- | {base:.2f} | - |",
    ]
    for bits in (4, 3, 2):
        for G in args.groups:
            for rounding in ("rtn", "gptq"):
                settings = {
                    "lowbit": {
                        "bits": str(bits),
                        "group_size": str(G),
                        "rounding": rounding,
                        "layers": args.layers,
                        "measure": "0",
                    }
                }
                budget = OutputBudget(model, feeds, FIXED)
                result = optimize(model, make_passes(["lowbit"]), feeds, budget, FIXED, settings=settings)
                recs = {r.node: r for r in result.records if r.status == "applied"}
                errs = [f"{recs[n].est_error:.4f}" if n in recs else "-" for n in names]
                size = sum(r.bytes_after for r in recs.values())
                top1 = fashion_mnist.top1(make_session(result.model.SerializeToString()))
                cells = [
                    str(bits),
                    str(G),
                    rounding,
                    *errs,
                    f"{size:,}",
                    f"{top1:.2f}",
                    f"{top1 - base:+.2f}",
                ]
                rows.append("| " + " | ".join(cells) + " |")
                print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
