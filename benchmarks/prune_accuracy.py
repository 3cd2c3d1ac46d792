"""prune on real models: weights removed against accuracy, with and without the layer-wise re-fit.

Fashion-MNIST classifier (models/fashion_mnist.onnx, 256 calibration images from the training set, top-1 on
the 10,000 test images) and the PP-OCRv4 recognizer (32 rendered calibration lines, character error rate on
200 other rendered lines). Each row is one optimization with the `prune` pass: either fixed sparsities
(`prune.fc_sparsity`, `prune.conv_sparsity`) under a budget loose enough to keep them all, or the task
metric as the budget (the CLI's `--eval ... --max-drop 0.5`), where the pass manager chooses the sparsity of
every layer; `--max-error` only sets which options are planned (a layer's estimated error up to 8x it).
"weights removed" counts the zeros of the pruned layers over all weights of that layer kind in the model
(FC = Gemm/MatMul with constant weights or SparseGemm, Conv = group-1 Conv or SparseConv), the layers the pass
declines included (such as Fashion-MNIST's conv1, 576 weights: fewer than prune.min_k inputs per output).
The metric budget is measured on the same test images the table reports, as `onnxopt optimize --eval` does.

Run from the repo root after scripts/setup.sh:
    .venv/bin/python benchmarks/prune_accuracy.py [--models fmnist ocr] [--only LABEL-SUBSTRING]
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
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import fashion_mnist, ocr  # noqa: E402
from onnxopt import DOMAIN, make_session  # noqa: E402
from onnxopt.budget import MetricBudget, OutputBudget  # noqa: E402
from onnxopt.data import load_npz  # noqa: E402
from onnxopt.errors import BudgetError  # noqa: E402
from onnxopt.graph import normalize  # noqa: E402
from onnxopt.manager import optimize  # noqa: E402
from onnxopt.passes import make_passes  # noqa: E402

BENCH = ROOT / "models" / "data" / "bench"
FIXED = 10.0  # an output budget no fixed setting breaks: the rows with fixed sparsities show what they cost


def fmnist_case() -> dict:
    model = onnx.load(str(ROOT / "models" / "fashion_mnist.onnx"))
    return {
        "name": "Fashion-MNIST",
        "model": model,
        "feeds": load_npz(fashion_mnist.write_calibration(BENCH / "fmnist.npz", n=256), model),
        # (label, shown metric, budget metric: higher is better, its --eval name)
        "metric": ("top-1 %", fashion_mnist.top1, fashion_mnist.top1, "models.fashion_mnist:top1"),
        "rows": [
            ("FC 80%, Conv 50%", {"fc_sparsity": "0.8", "conv_sparsity": "0.5"}, None),
            ("FC 80%, Conv 60%", {"fc_sparsity": "0.8", "conv_sparsity": "0.6"}, None),
            ("FC 90%, Conv 60%", {"fc_sparsity": "0.9", "conv_sparsity": "0.6"}, None),
            ("2:4 (layers whose K allows it)", {"pattern": "2:4"}, None),
            (
                "FC 80%, Conv 50%, 1x4 blocks",
                {"pattern": "1x4", "fc_sparsity": "0.8", "conv_sparsity": "0.5"},
                None,
            ),
            (
                "FC 80%, Conv 50%, 4x1 blocks",
                {"pattern": "4x1", "fc_sparsity": "0.8", "conv_sparsity": "0.5"},
                None,
            ),
            ("budget: top-1 drop <= 0.5", {}, 0.5),
            # 4x1: the output blocks SparseGemm / SparseConv run as blocked kernels (prune_block.h)
            ("budget: top-1 drop <= 0.5, 4x1 blocks", {"pattern": "4x1"}, 0.5),
        ],
    }


def ocr_case() -> dict:
    model = onnx.load(str(ocr.fetch()["rec"]))
    return {
        "name": "PP-OCRv4 rec",
        "model": model,
        "feeds": load_npz(ocr.write_calibration(BENCH / "rec32.npz", n=32), model),
        "metric": ("CER %", ocr.cer, ocr.score, "models.ocr:score"),  # score = -CER
        "rows": [
            ("all 50%", {"sparsity": "0.5"}, None),
            ("budget: CER rise <= 0.5", {}, 0.5),
        ],
    }


def weight_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Weights and zeros of the FC and group-1 Conv layers with constant weights."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    normalize(m)
    inits = {t.name: t for t in m.graph.initializer}
    counts = {"fc": 0, "fc_zeros": 0, "conv": 0, "conv_zeros": 0}
    for node in m.graph.node:
        if node.op_type in ("SparseGemm", "SparseConv") and node.domain == DOMAIN:
            # a layer the pass turned into a sparse op (faster than dense there): rows x columns, its nonzeros
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            values, row_ptr = (numpy_helper.to_array(inits[name]) for name in (node.input[1], node.input[3]))
            cols = (
                attrs["K"]
                if node.op_type == "SparseGemm"
                else attrs["C"] * int(np.prod(attrs["kernel_shape"]))
            )
            kind = "fc" if node.op_type == "SparseGemm" else "conv"
            counts[kind] += (len(row_ptr) - 1) * cols
            counts[kind + "_zeros"] += (len(row_ptr) - 1) * cols - int(np.count_nonzero(values))
            continue
        if (
            node.op_type not in ("Gemm", "MatMul", "Conv")
            or len(node.input) < 2
            or node.input[1] not in inits
        ):
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group != 1:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        kind = "conv" if node.op_type == "Conv" else "fc"
        counts[kind] += w.size
        counts[kind + "_zeros"] += int(np.sum(w == 0))
    return counts


def run_row(case: dict, settings: dict, max_drop: float | None, reconstruct: bool) -> tuple[dict, float]:
    model, feeds = case["model"], case["feeds"]
    settings = {**settings, "reconstruct": "1" if reconstruct else "0"}
    if max_drop is None:
        budget, max_error = OutputBudget(model, feeds, FIXED), FIXED
    else:
        _, _, metric, spec = case["metric"]
        budget, max_error = MetricBudget(model, metric, max_drop, name=spec), 0.1
    result = optimize(model, make_passes(["prune"]), feeds, budget, max_error, settings={"prune": settings})
    score = case["metric"][1](make_session(result.model.SerializeToString()))
    return weight_counts(result.model), score


def table(case: dict, only: str | None = None) -> list[str]:
    label, metric, _, spec = case["metric"]
    base = metric(make_session(case["model"].SerializeToString()))
    head = ["setting", "re-fit", "FC weights removed", "Conv weights removed", label, "change", "seconds"]
    lines = [f"### {case['name']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(f"| original | - | 0% | 0% | {base:.2f} | - | - |")
    for name, settings, max_drop in case["rows"]:
        if only and only not in name:
            continue
        for reconstruct in (True, False):
            t = time.perf_counter()
            try:
                counts, score = run_row(case, settings, max_drop, reconstruct)
            except BudgetError:
                lines.append(f"| {name} | {'on' if reconstruct else 'off'} | nothing fits | | | | |")
                continue
            fc = counts["fc_zeros"] / max(counts["fc"], 1)
            conv = counts["conv_zeros"] / max(counts["conv"], 1)
            row = (
                f"| {name} | {'on' if reconstruct else 'off'} | {100 * fc:.1f}% | {100 * conv:.1f}% | "
                f"{score:.2f} | {score - base:+.2f} | {time.perf_counter() - t:.0f} |"
            )
            lines.append(row)
            print(row, file=sys.stderr, flush=True)
    return [*lines, "", f"(--eval {spec}; max-drop as in the row)", ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["fmnist", "ocr"], default=["fmnist", "ocr"])
    parser.add_argument("--only", help="substring of the row labels to run")
    args = parser.parse_args(argv)
    cases = {"fmnist": fmnist_case, "ocr": ocr_case}
    out = []
    for name in args.models:
        out += table(cases[name](), args.only)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
