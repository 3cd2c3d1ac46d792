"""FFTConv against onnxruntime's Conv on one-node models: the two goal shapes (7x7 3->64 at 224x224, and the
first conv of torchcrepe's pitch model, 512x1 stride 4), crepe's second conv (64x1, 'same' padding), and for
reference the 7x7 layer at batch 4 and a 5x5 64->64 layer at 56x56.

Times are medians of A/B interleaved runs with the cache flushed (onnxopt.timing.median_times), at 1 and 2
threads, batch 1 unless the label says otherwise; the table also gives the relative L2 error of FFTConv
against onnxruntime's Conv. Weights
are random of the real shapes (crepe 'full' sizes; `--tiny` for the tiny model's).

    .venv/bin/python benchmarks/fftconv.py [--tiny] [--rounds 15] [--only TEXT] [--threads 1 2]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt.library import session_for
from onnxopt.timing import median_times


def conv_model(op: str, x_shape: list[int], W: np.ndarray, B: np.ndarray, pads, strides) -> onnx.ModelProto:
    """Y = op(X, W, B) with a fixed input shape."""
    attrs = {"pads": list(pads), "strides": list(strides)}
    if op == "Conv":
        attrs["kernel_shape"] = list(W.shape[2:])
    node = helper.make_node(op, ["X", "W", "B"], ["Y"], domain="" if op == "Conv" else "onnxopt", **attrs)
    graph = helper.make_graph(
        [node],
        "bench",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("onnxopt", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def shapes(tiny: bool) -> list[tuple[str, list[int], tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(label, X shape, W shape, pads, strides) of each benchmarked layer."""
    f1, f2 = (128, 16) if tiny else (1024, 128)
    return [
        ("7x7 3->64 224x224 s1 p3", [1, 3, 224, 224], (64, 3, 7, 7), (3, 3, 3, 3), (1, 1)),
        ("7x7 3->64 224x224 s1 p3 batch 4", [4, 3, 224, 224], (64, 3, 7, 7), (3, 3, 3, 3), (1, 1)),
        ("5x5 64->64 56x56 s1 p2", [1, 64, 56, 56], (64, 64, 5, 5), (2, 2, 2, 2), (1, 1)),
        (
            f"crepe conv1 512x1 1->{f1} s4 on 1532",
            [1, 1, 1024 + 2 * 254, 1],
            (f1, 1, 512, 1),
            (0,) * 4,
            (4, 1),
        ),
        (
            f"crepe conv2 64x1 {f1}->{f2} 'same' on 256",
            [1, f1, 256, 1],
            (f2, f1, 64, 1),
            (31, 0, 32, 0),
            (1, 1),
        ),
    ]


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="crepe 'tiny' channel counts instead of 'full'")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--only", default="", help="run only the shapes whose label contains this text")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| shape | threads | ORT ms | FFTConv ms | ratio | rel L2 |")
    print("|---|---|---|---|---|---|")
    for label, x_shape, w_shape, pads, strides in shapes(args.tiny):
        if args.only not in label:
            continue
        fan_in = int(np.prod(w_shape[1:]))
        W = (rng.standard_normal(w_shape) / np.sqrt(fan_in)).astype(np.float32)
        B = (0.1 * rng.standard_normal(w_shape[0])).astype(np.float32)
        models = [conv_model(op, x_shape, W, B, pads, strides) for op in ("Conv", "FFTConv")]
        X = rng.standard_normal(x_shape).astype(np.float32)
        ys = [session_for(m, 1).run(None, {"X": X})[0] for m in models]
        err = rel_l2(ys[1], ys[0])
        for threads in args.threads:
            ort_ms, fft_ms = median_times(models, threads, rounds=args.rounds)
            print(
                f"| {label} | {threads} | {ort_ms:.3f} | {fft_ms:.3f} | {ort_ms / fft_ms:.2f}x | {err:.1e} |"
            )


if __name__ == "__main__":
    main()
