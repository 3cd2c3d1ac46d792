"""filter_prune on Fashion-MNIST: FLOPs, size and top-1 of the smaller dense model, with and without the
least-squares merge of the removed filters into the next layer.

models/fashion_mnist.onnx (conv1..conv4 -> avgpool -> flatten -> fc1 -> fc2), 256 calibration images from the
training set, top-1 on the 10,000 test images. Two budgets: the default (`--max-error 1e-2`: relative L2 of
the logits), and the task metric (`--eval models.fashion_mnist:top1 --max-drop 0.5 --max-error 0.1`),
measured on the same test images the table reports, as `onnxopt optimize --eval` does. FLOPs and
parameters are the whole model's (onnxopt.analysis); "filters" lists the filters each Conv keeps.
Every model is checked with onnx.checker (full_check) before it is scored.

Run from the repo root after scripts/setup.sh:
    .venv/bin/python benchmarks/filter_prune.py [--criterion merge|apoz|l1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import fashion_mnist  # noqa: E402
from onnxopt import make_session  # noqa: E402
from onnxopt.analysis import node_stats, totals  # noqa: E402
from onnxopt.budget import MetricBudget, OutputBudget  # noqa: E402
from onnxopt.data import load_npz  # noqa: E402
from onnxopt.errors import BudgetError  # noqa: E402
from onnxopt.manager import optimize  # noqa: E402
from onnxopt.passes import make_passes  # noqa: E402

BENCH = ROOT / "models" / "data" / "bench"
BUDGETS = [("default: logits rel. L2 <= 1e-2", None, 1e-2), ("top-1 drop <= 0.5", 0.5, 0.1)]


def filters(model: onnx.ModelProto) -> str:
    inits = {t.name: t for t in model.graph.initializer}
    return "/".join(str(inits[n.input[1]].dims[0]) for n in model.graph.node if n.op_type == "Conv")


def run_row(model, feeds, max_drop, max_error, settings) -> onnx.ModelProto:
    if max_drop is None:
        budget = OutputBudget(model, feeds, max_error)
    else:
        budget = MetricBudget(model, fashion_mnist.top1, max_drop, name="models.fashion_mnist:top1")
    passes = make_passes(["filter_prune"])
    return optimize(model, passes, feeds, budget, max_error, settings={"filter_prune": settings}).model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criterion", default="merge", choices=["merge", "apoz", "l1"])
    args = parser.parse_args(argv)
    model = onnx.load(str(ROOT / "models" / "fashion_mnist.onnx"))
    feeds = load_npz(fashion_mnist.write_calibration(BENCH / "fmnist.npz", n=256), model)
    base = totals(node_stats(model))
    top1 = fashion_mnist.top1(make_session(model.SerializeToString()))
    head = ["budget", "merge", "conv filters", "MFLOPs", "params", "top-1 %", "seconds"]
    lines = [f"criterion: {args.criterion}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mflops = base["flops"] / 1e6
    lines.append(f"| original | - | {filters(model)} | {mflops:.1f} | {base['params']:,} | {top1:.2f} | - |")
    for label, max_drop, max_error in BUDGETS:
        for reconstruct in (True, False):
            t = time.perf_counter()
            settings = {"criterion": args.criterion, "reconstruct": "1" if reconstruct else "0"}
            try:
                out = run_row(model, feeds, max_drop, max_error, settings)
            except BudgetError:
                lines.append(f"| {label} | {'on' if reconstruct else 'off'} | nothing fits | | | | |")
                continue
            onnx.checker.check_model(out, full_check=True)
            got = totals(node_stats(out))
            score = fashion_mnist.top1(make_session(out.SerializeToString()))
            row = (
                f"| {label} | {'on' if reconstruct else 'off'} | {filters(out)} | "
                f"{got['flops'] / 1e6:.1f} ({100 * got['flops'] / base['flops']:.0f}%) | "
                f"{got['params']:,} ({100 * got['params'] / base['params']:.0f}%) | {score:.2f} | "
                f"{time.perf_counter() - t:.0f} |"
            )
            lines.append(row)
            print(row, file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
