"""Structured FC methods on real models: size against accuracy at fixed settings, and what the budget keeps.

For each method (lowrank, circulant, fastfood, acdc, tensor_train) and each fixed setting (rank, block size,
stack depth), every FC layer the method accepts is rewritten under a budget loose enough to keep it, and the
row gives the rewritten layers' bytes before / after, the whole file's ratio, the worst output relative L2
on the calibration data and the task metric on held-out data. The last column says whether the default
budget (relative L2 <= 1e-2) would keep that rewrite; the "budget" rows are what the method does on its own
at the default budget. Without retraining, most trained layers are not close to block-circulant, Fastfood
or ACDC structure: their rows show the loss, and the budget is what rejects them.

Models: the Fashion-MNIST classifier (fc1 1024x1024, fc2 1024x10; top-1 on the 10,000 test images) and the
PP-OCRv4 recognizer (its SVTR neck's MatMuls 120x360, 120x120, 120x240, 240x120 and the 120x6625 character
head; character error rate on rendered lines), and all-MiniLM-L6-v2 (36 MatMuls applied to every token: Q, K,
V and attention output 384x384, FFN 384x1536 and 1536x384 in each of 6 layers; retrieval agreement with the
original model on 200 real English sentences, the mean cosine of the embeddings to the original's beside it).

Run from the repo root after scripts/setup.sh:
    .venv/bin/python benchmarks/structured_accuracy.py [--quick] [--methods M ...] [--models NAME ...]
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

from models import fashion_mnist, minilm, ocr  # noqa: E402
from onnxopt import make_session  # noqa: E402
from onnxopt.budget import OutputBudget  # noqa: E402
from onnxopt.data import dims_from_feeds, load_npz  # noqa: E402
from onnxopt.errors import BudgetError  # noqa: E402
from onnxopt.manager import optimize  # noqa: E402
from onnxopt.passes import make_passes  # noqa: E402

DEFAULT_BUDGET = 1e-2
LOOSE = 1e3  # a budget that keeps every rewrite a fixed setting produces

# method -> (setting key, values): most compressive first
SETTINGS = {
    "lowrank": ("rank", [16, 32, 64, 128]),
    "circulant": ("block", [1024, 256, 64, 16]),
    "fastfood": ("depth", [1, 2, 4]),
    "acdc": ("depth", [1, 4, 8]),
    "tensor_train": ("rank", [4, 8, 16, 32]),
}
HEADER = [
    "model",
    "method",
    "setting",
    "rewritten",
    "their bytes",
    "file",
    "rel L2",
    "metric",
    "default budget",
]


MODELS = ("fashion_mnist", "ppocr_rec", "minilm")


def real_models(quick: bool, names: tuple[str, ...] = MODELS) -> list[dict]:
    """The selected models with their calibration files and metrics (built only when selected)."""
    calib = ROOT / "models" / "data" / "bench"
    specs = {
        "fashion_mnist": lambda: {
            "path": ROOT / "models" / "fashion_mnist.onnx",
            "calib": fashion_mnist.write_calibration(calib / "fmnist.npz", n=256),
            "metric": ("top-1 %", lambda s: fashion_mnist.top1(s, n=2000 if quick else None)),
        },
        "ppocr_rec": lambda: {
            "path": ocr.fetch()["rec"],
            "calib": ocr.write_calibration(calib / "rec.npz", n=16),
            "metric": ("CER %", lambda s: ocr.cer(s, n=40 if quick else 200)),
        },
        "minilm": lambda: {
            "path": minilm.model_path(),
            "calib": minilm.write_calibration(calib / "minilm.npz", n=32),
            "metric": ("retrieval agreement %", lambda s: minilm.score(s, n=100 if quick else minilm.N_EVAL)),
            "detail": lambda s: f"cos {minilm.cosine(s, n=100 if quick else minilm.N_EVAL):.4f}",
        },
    }
    return [{"name": name} | specs[name]() for name in names]


def _describe(result, setting: str) -> tuple[str, str]:
    applied = [r for r in result.records if r.status == "applied"]
    before = sum(r.bytes_before for r in applied)
    after = sum(r.bytes_after for r in applied)
    names = f"{len(applied)} layers" if len(applied) > 2 else ", ".join(r.node for r in applied)
    if setting == "budget" and applied:
        key = SETTINGS[applied[0].method][0]
        names += " (" + ", ".join(str(r.detail.get(key, r.detail.get("block"))) for r in applied) + ")"
    return names or "none", f"{before / max(after, 1):.2f}x" if applied else "-"


def _why(records) -> str:
    """The reason that best explains an unchanged model: an undone rewrite's, else a dense layer's decline
    other than the ones every model has (layers too small, or weights computed at run time)."""
    usual = ("too small", "not a constant", "opt-in", "not a 1x1 kernel")
    for keep in (
        lambda r: r.status == "undone",
        lambda r: r.op_type in ("Gemm", "MatMul") and not any(u in r.reason for u in usual),
        lambda r: bool(r.reason),
    ):
        found = next((r.reason for r in records if keep(r)), None)
        if found:
            return found
    return "no candidate layer"


def method_rows(spec: dict, method: str, quick: bool) -> list[list[str]]:
    model = onnx.load(str(spec["path"]))
    feeds = load_npz(spec["calib"], model)
    dims = dims_from_feeds(model, feeds)
    metric = spec["metric"][1]
    key, values = SETTINGS[method]
    runs = [(f"{key} {v}", LOOSE, {key: str(v)}) for v in (values[::2] if quick else values)]
    runs.append(("budget", DEFAULT_BUDGET, {}))
    rows = []
    for setting, max_error, settings in runs:
        t0 = time.perf_counter()
        try:
            result = optimize(
                model,
                make_passes([method]),
                feeds,
                OutputBudget(model, feeds, max_error),
                max_error,
                settings={method: settings},
                dims=dims,
            )
        except BudgetError as e:
            why = f"none kept: every candidate undone, {str(e).split('; ')[-1]}"
            rows.append([spec["name"], method, setting, why, "-", "1.00x", "-", "-", "-"])
            print(" | ".join(rows[-1]), f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
            continue
        what, bytes_ratio = _describe(result, setting)
        if not result.changed:
            why = _why(result.records)
            rows.append([spec["name"], method, setting, f"none: {why[:120]}", "-", "1.00x", "-", "-", "-"])
            print(" | ".join(rows[-1]), f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
            continue
        err = result.verification["worst_rel_l2"]
        session = make_session(result.model.SerializeToString())
        score = f"{metric(session):.2f}"
        if "detail" in spec:
            score += f" ({spec['detail'](session)})"
        rows.append(
            [
                spec["name"],
                method,
                setting,
                what,
                bytes_ratio,
                f"{model.ByteSize() / result.model.ByteSize():.2f}x",
                f"{err:.2g}",
                score,
                "kept" if err <= DEFAULT_BUDGET else "rejected",
            ]
        )
        print(" | ".join(rows[-1]), f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    return rows


def rows(quick: bool, methods: list[str], names: tuple[str, ...] = MODELS) -> list[list[str]]:
    out = []
    for spec in real_models(quick, names):
        label, metric = spec["metric"]
        session = make_session(onnx.load(str(spec["path"])).SerializeToString())
        base = f"{label} {metric(session):.2f}"
        if "detail" in spec:
            base += f" ({spec['detail'](session)})"
        out.append([spec["name"], "original", "-", "-", "-", "1.00x", "0", base, "-"])
        for method in methods:
            out += method_rows(spec, method, quick)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer settings and test samples")
    ap.add_argument("--methods", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args = ap.parse_args()
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(args.quick, args.methods, tuple(args.models))]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
