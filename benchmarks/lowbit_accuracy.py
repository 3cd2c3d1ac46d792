"""lowbit on Fashion-MNIST's FC layers (fc1 1024x1024, fc2 1024x10) or its Convs (conv2 64->64, conv3
64->128, conv4 128->256, all 3x3; conv1 has 9 weights per filter, fewer than a group, and is declined): top-1
on the 10,000 test images and the layers' estimated (held-out calibration rows) output error, RTN against GPTQ
rounding at 4, 3 and 2 bits.

Each row is one `optimize` with the lowbit pass fixed to one layer kind, bit width, group size and rounding
(`--set lowbit.layers=fc|conv lowbit.bits=B lowbit.group_size=G lowbit.rounding=R lowbit.measure=0`) under an
output budget no setting breaks, so that every selected layer is rewritten and the row shows what it costs
(not timed: this is accuracy). Calibration: N random training images (never test images); GPTQ's H is built
from half of their rows (Conv: input patches) and the error is estimated on the other half.

`--act-bits 8` adds rows with int8 activations (`lowbit.act_bits=8`: 4-bit codes, each input row quantized to
int8 at run time), whose estimated error includes that quantization. `--model rec` runs the FC (MatMul) layers
of the PP-OCRv4 recognizer instead, scored by the character error rate on 200 rendered text lines.

Run from the repo root after scripts/setup.sh:
    .venv/bin/python benchmarks/lowbit_accuracy.py [--layers fc|conv] [--calib 1024] [--groups 32 128]
        [--bits 4 3 2] [--act-bits 0 8] [--model fmnist|rec]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import fashion_mnist, ocr  # noqa: E402
from onnxopt import make_session  # noqa: E402
from onnxopt.budget import OutputBudget  # noqa: E402
from onnxopt.data import load_npz  # noqa: E402
from onnxopt.graph import normalize  # noqa: E402
from onnxopt.manager import optimize  # noqa: E402
from onnxopt.passes import make_passes  # noqa: E402

BENCH = ROOT / "models" / "data" / "bench"
FIXED = 10.0  # an output budget no fixed setting breaks


def load_case(name: str, calib: int) -> tuple[onnx.ModelProto, dict, str, Callable]:
    """(model, calibration feeds, metric label, metric(session)) of one real model."""
    if name == "rec":
        model = onnx.load(str(ocr.fetch()["rec"]))
        normalize(model)
        feeds = load_npz(ocr.write_calibration(BENCH / "rec32.npz", n=32), model)
        return model, feeds, "CER %", ocr.cer
    model = onnx.load(str(ROOT / "models" / "fashion_mnist.onnx"))
    feeds = load_npz(fashion_mnist.write_calibration(BENCH / f"fmnist{calib}.npz", n=calib), model)
    return model, feeds, "top-1 %", fashion_mnist.top1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=1024, help="calibration images from the training set")
    ap.add_argument("--groups", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    ap.add_argument("--act-bits", nargs="+", type=int, default=[0], help="0 (float inputs) and/or 8")
    ap.add_argument("--layers", choices=("fc", "conv"), default="fc")
    ap.add_argument("--model", choices=("fmnist", "rec"), default="fmnist")
    args = ap.parse_args()
    model, feeds, label, metric = load_case(args.model, args.calib)
    if args.model == "rec":
        names, fp32 = (), "FC bytes"
    else:
        names = ("fc1", "fc2") if args.layers == "fc" else ("conv2", "conv3", "conv4")
        fp32 = {"fc": "FC bytes (fp32 4,239,400)", "conv": "conv2-4 bytes (fp32 1,623,808)"}[args.layers]
    err_heads = [f"{n} est. error" for n in names] or ["layers", "max est. error"]
    rows = [
        "| bits | act | group | rounding | " + " | ".join(err_heads) + f" | {fp32} | {label} | change |",
        "|---" * (7 + len(err_heads)) + "|",
    ]
    base = metric(make_session(model.SerializeToString()))
    rows.append(f"| fp32 | - | - | - | {'- | ' * len(err_heads)}- | {base:.2f} | - |")
    for bits in args.bits:
        for act in args.act_bits:
            if act == 8 and bits != 4:
                continue  # int8 activations run with 4-bit codes only
            for G in args.groups:
                for rounding in ("rtn", "gptq"):
                    settings = {
                        "bits": str(bits),
                        "group_size": str(G),
                        "rounding": rounding,
                        "layers": args.layers,
                        "measure": "0",
                        "act_bits": str(act),
                    }
                    budget = OutputBudget(model, feeds, FIXED)
                    result = optimize(
                        model, make_passes(["lowbit"]), feeds, budget, FIXED, settings={"lowbit": settings}
                    )
                    recs = {r.node: r for r in result.records if r.status == "applied"}
                    if names:
                        errs = [f"{recs[n].est_error:.4f}" if n in recs else "-" for n in names]
                    else:
                        errs = [str(len(recs)), f"{max((r.est_error for r in recs.values()), default=0):.4f}"]
                    size = sum(r.bytes_after for r in recs.values())
                    score = metric(make_session(result.model.SerializeToString()))
                    act_cell = "int8" if act == 8 else "fp32"
                    cells = [str(bits), act_cell, str(G), rounding, *errs, f"{size:,}", f"{score:.2f}"]
                    rows.append("| " + " | ".join(cells) + f" | {score - base:+.2f} |")
                    print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
