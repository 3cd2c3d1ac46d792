"""Fast convolution against onnxruntime: single layers (WinogradConv, and the kernels of the other
convolution methods through their own benchmark modules) and whole models optimized by the speed-only passes.

Layers: one-node models, onnxruntime's Conv at ORT_ENABLE_ALL against the custom op, batch 1, A/B interleaved
in one process with a 64 MiB buffer touched before every run (onnxopt.timing.median_times); ratio = ORT ms /
custom op ms (> 1: faster than onnxruntime). Whole models: `optimize` with the convolution methods at the
target thread count (each layer timed, kept only if faster, the whole model timed again), then whole-model
latency of original and optimized, interleaved.

Run from the repo root after scripts/setup.sh:  .venv/bin/python benchmarks/conv.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# numpy's OpenBLAS threads spin after use and would take the second of the two cores from the timed runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import cnn, fashion_mnist, ocr  # noqa: E402
from onnxopt import DOMAIN, make_session  # noqa: E402
from onnxopt.bench import latency  # noqa: E402
from onnxopt.budget import OutputBudget  # noqa: E402
from onnxopt.data import load_npz, synthetic_inputs  # noqa: E402
from onnxopt.manager import optimize  # noqa: E402
from onnxopt.passes import make_passes  # noqa: E402
from onnxopt.timing import median_times  # noqa: E402

WINOGRAD_SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]  # ResNet's 3x3 layers: channels, size


def conv3x3(c: int, hw: int, tile: int | None) -> onnx.ModelProto:
    """c -> c 3x3 pad 1 at batch 1: onnxruntime's Conv (tile None) or WinogradConv F(tile x tile)."""
    rng = np.random.default_rng(c)
    W = (rng.standard_normal((c, c, 3, 3)) * np.sqrt(2 / (9 * c))).astype(np.float32)
    B = rng.standard_normal(c).astype(np.float32)
    if tile is None:
        node = helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    else:
        node = helper.make_node(
            "WinogradConv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1], tile=tile, domain=DOMAIN
        )
    g = helper.make_graph(
        [node],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, hw, hw])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(g, opset_imports=opsets)


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


PASSES = 3  # the whole table is measured this many times, spread out in time; each figure is the median


def winograd_rows(rounds: int) -> list[list[str]]:
    """The shapes are measured in PASSES sweeps, not back to back: this shared machine has slow phases of
    seconds to minutes, and a figure taken in one sweep would carry whichever phase it fell in."""
    layers = []
    for c, hw in WINOGRAD_SHAPES:
        models = [conv3x3(c, hw, t) for t in (None, 2, 4)]
        x = {"x": np.random.default_rng(0).standard_normal((1, c, hw, hw)).astype(np.float32)}
        ref, f2, f4 = (make_session(m.SerializeToString(), threads=1).run(None, x)[0] for m in models)
        layers.append((c, hw, models, f"{_rel_l2(f2, ref):.1e} / {_rel_l2(f4, ref):.1e}"))
    times: dict[tuple[int, int], list[list[float]]] = {}
    for _ in range(PASSES):
        for i, (_, _, models, _) in enumerate(layers):
            for threads in (1, 2):
                times.setdefault((i, threads), []).append(median_times(models, threads, rounds))
    rows = []
    for i, (c, hw, _, err) in enumerate(layers):
        for threads in (1, 2):
            t_ref, t_f2, t_f4 = np.median(np.array(times[i, threads]), axis=0)
            rows.append(
                [
                    f"{c}@{hw}x{hw}",
                    str(threads),
                    f"{t_ref:.3f}",
                    f"{t_f2:.3f}",
                    f"{t_ref / t_f2:.2f}x",
                    f"{t_f4:.3f}",
                    f"{t_ref / t_f4:.2f}x",
                    err,
                ]
            )
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


WINOGRAD_HEADER = [
    "layer",
    "threads",
    "ORT Conv ms",
    "F(2x2) ms",
    "F(2x2) speedup",
    "F(4x4) ms",
    "F(4x4) speedup",
    "rel L2 F(2x2) / F(4x4)",
]


def e2e_models(quick: bool) -> list[tuple[str, onnx.ModelProto, dict]]:
    """(name, model, calibration feeds) of the whole-model measurements."""
    out = []
    for name, model in (("ResNet-18-shaped 224", cnn.resnet18()), ("YOLOv8n-shaped 320", cnn.yolo_like())):
        out.append((name, model, synthetic_inputs(model, samples=2, seed=0)))
    det = onnx.load(str(ocr.fetch()["det"]))
    calib = ROOT / "models" / "data" / "bench"
    out.append(("PP-OCRv4 det", det, load_npz(ocr.write_det_calibration(calib / "det.npz", n=2), det)))
    fm = onnx.load(str(ROOT / "models" / "fashion_mnist.onnx"))
    fm_calib = fashion_mnist.write_calibration(calib / "fmnist.npz", n=64)
    out.append(("Fashion-MNIST", fm, load_npz(fm_calib, fm)))
    return out[:2] if quick else out


def e2e_rows(methods: list[str], quick: bool) -> list[list[str]]:
    rows = []
    for name, model, feeds in e2e_models(quick):
        for threads in (1, 2):
            t0 = time.perf_counter()
            budget = OutputBudget(model, feeds, 1e-3)
            result = optimize(model, make_passes(methods), feeds, budget, 1e-3, threads=threads)
            secs = time.perf_counter() - t0
            applied = {}
            for r in result.records:
                if r.status == "applied":
                    applied[r.method] = applied.get(r.method, 0) + 1
            convs = sum(n.op_type == "Conv" for n in model.graph.node)
            # Three separate interleaved measurements, the median of each side: one alone can fall in a slow
            # phase of this shared machine.
            runs = [latency([model, result.model], feeds, threads=threads, rounds=20) for _ in range(PASSES)]
            before = {"median_ms": float(np.median([r[0]["median_ms"] for r in runs]))}
            after = {"median_ms": float(np.median([r[1]["median_ms"] for r in runs]))}
            ratio = f"{before['median_ms'] / after['median_ms']:.2f}x"
            rewritten = ", ".join(f"{m} {k}" for m, k in applied.items())
            if not result.changed:  # the same model twice: its ratio is only noise
                rewritten, ratio = "none (no layer faster, or the whole model not faster)", "unchanged"
            rows.append(
                [
                    name,
                    str(threads),
                    f"{rewritten} of {convs} Conv",
                    f"{before['median_ms']:.2f}",
                    f"{after['median_ms']:.2f}",
                    ratio,
                    f"{result.verification.get('worst_rel_l2', 0.0):.1e}",
                    f"{secs:.0f} s",
                ]
            )
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


E2E_HEADER = [
    "model",
    "threads",
    "layers rewritten",
    "ORT ms",
    "optimized ms",
    "speedup",
    "rel L2",
    "optimize time",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(winograd_rows(5 if args.quick else 21))
    print(e2e_rows(["winograd", "depthwise"], args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
