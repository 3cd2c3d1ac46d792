"""LowBitMatMul against onnxruntime on one FC layer at batch 1 (and a small batch): fp32 MatMul, its 4-bit
MatMulNBits (com.microsoft, block 32, asymmetric: with zero points; accuracy_level 0 = fp32 compute and 4 =
int8 compute) and its int8 (quantize_dynamic of the same MatMul: DynamicQuantizeLinear + MatMulInteger).
"a8" is LowBitMatMul with act_bits=8 (each input row quantized to int8, integer dot products). Columns
ending in "avx2" are the same model with its kernel created under ONNXOPT_DISABLE_AVX512=1 (the AVX2 build of
the batch-1 loops, where the CPU has AVX-512 VNNI), so that one run shows both builds.

Ratios are fp32 MatMul time / other time, measured in one process with onnxopt.timing.session_times
(interleaved, 64 MiB cache flush before every run, spinning off), at 1 and 2 threads. Weights are random:
speed
does not depend on their values. The issue's goal: 4 bits >= 3x the fp32 MatMul at batch 1.

Run from the repo root after scripts/setup.sh (under the machine's benchmark lock):
    flock /tmp/onnxopt-bench.lock .venv/bin/python benchmarks/lowbit.py [--shapes 4096x4096 25088x4096]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxopt.reference.lowbit import pack_codes, padded_k  # noqa: E402
from onnxopt.timing import session_times  # noqa: E402

OPSETS = [
    helper.make_opsetid("", 17),
    helper.make_opsetid("onnxopt", 1),
    helper.make_opsetid("com.microsoft", 1),
]


def _model(node: onnx.NodeProto, inits: list, batch: int, K: int, N: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "fc",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, N])],
        inits,
    )
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=10)


def dense(batch: int, K: int, N: int) -> onnx.ModelProto:
    W = (np.random.default_rng(0).standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    return _model(
        helper.make_node("MatMul", ["X", "W"], ["Y"]), [numpy_helper.from_array(W, "W")], batch, K, N
    )


def lowbit(batch: int, K: int, N: int, bits: int, G: int, act_bits: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    Kp = padded_k(K, G)
    Q = pack_codes(rng.integers(0, 1 << bits, (Kp, N), dtype=np.uint8), bits)
    S = (rng.random((N, Kp // G)) / np.sqrt(K)).astype(np.float32)
    Z = rng.integers(0, 1 << bits, (N, Kp // G), dtype=np.uint8)
    extra = {"act_bits": act_bits} if act_bits else {}
    node = helper.make_node(
        "LowBitMatMul",
        ["X", "Q", "S", "Z"],
        ["Y"],
        domain="onnxopt",
        K=K,
        N=N,
        bits=bits,
        group_size=G,
        **extra,
    )
    inits = [numpy_helper.from_array(a, n) for a, n in ((Q, "Q"), (S, "S"), (Z, "Z"))]
    return _model(node, inits, batch, K, N)


def nbits(batch: int, K: int, N: int, level: int, block: int = 32) -> onnx.ModelProto:
    """onnxruntime's MatMulNBits, 4 bits, built by hand: B [N, K/block, block/2] two codes per byte, scales
    [N * K/block], zero points packed two per byte [N, ceil(K/block / 2)]."""
    rng = np.random.default_rng(2)
    kb = -(-K // block)
    B = rng.integers(0, 256, (N, kb, block // 2), dtype=np.uint8)
    S = (rng.random(N * kb) / np.sqrt(K)).astype(np.float32)
    Z = rng.integers(0, 256, (N, -(-kb // 2)), dtype=np.uint8)
    node = helper.make_node(
        "MatMulNBits",
        ["X", "B", "S", "Z"],
        ["Y"],
        domain="com.microsoft",
        K=K,
        N=N,
        bits=4,
        block_size=block,
        accuracy_level=level,
    )
    inits = [numpy_helper.from_array(a, n) for a, n in ((B, "B"), (S, "S"), (Z, "Z"))]
    return _model(node, inits, batch, K, N)


def int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """quantize_dynamic of the fp32 model (int8 weights, per-tensor; activations quantized per run)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        onnx.save(model, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        return onnx.load(dst)


# Settings read at kernel creation, per column (the others get the best build this CPU runs).
COLUMN_ENV = {
    "lowbit 4b G128 avx2": {"ONNXOPT_DISABLE_AVX512": "1"},
    "lowbit 4b G128 a8 avx2": {"ONNXOPT_DISABLE_AVX512": "1"},
}


def sessions_for(models: list[onnx.ModelProto], names: list[str], threads: int) -> list:
    """One non-spinning session per model, each created under its column's COLUMN_ENV settings."""
    from onnxopt.library import session_for

    sessions = []
    for model, name in zip(models, names, strict=True):
        env = COLUMN_ENV.get(name, {})
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            sessions.append(session_for(model, threads, spin=False))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return sessions


COLUMNS = [
    ("lowbit 4b G32", lambda b, K, N: lowbit(b, K, N, 4, 32)),
    ("lowbit 4b G128", lambda b, K, N: lowbit(b, K, N, 4, 128)),
    ("lowbit 4b G128 avx2", lambda b, K, N: lowbit(b, K, N, 4, 128)),
    ("lowbit 4b G128 a8", lambda b, K, N: lowbit(b, K, N, 4, 128, act_bits=8)),
    ("lowbit 4b G128 a8 avx2", lambda b, K, N: lowbit(b, K, N, 4, 128, act_bits=8)),
    ("lowbit 3b G128", lambda b, K, N: lowbit(b, K, N, 3, 128)),
    ("lowbit 2b G128", lambda b, K, N: lowbit(b, K, N, 2, 128)),
    ("MatMulNBits 4b B32", lambda b, K, N: nbits(b, K, N, 0)),
    ("MatMulNBits 4b B32 acc4", lambda b, K, N: nbits(b, K, N, 4)),
    ("int8 dynamic", lambda b, K, N: int8(dense(b, K, N))),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096"], help="KxN of the layer")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--stat", choices=("median", "min"), default="median", help="min: for a loaded machine")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--only", nargs="+", help="columns to time (names as in the table), default all")
    args = ap.parse_args()
    columns = [c for c in COLUMNS if not args.only or c[0] in args.only]
    names = [c[0] for c in columns]
    rows = [
        "| K x N | batch | threads | fp32 MatMul ms | " + " | ".join(f"{n} ms (x)" for n in names) + " |",
        "|---" * (4 + len(names)) + "|",
    ]
    for shape in args.shapes:
        K, N = (int(v) for v in shape.split("x"))
        for batch in args.batches:
            models = [dense(batch, K, N)] + [make(batch, K, N) for _, make in columns]
            for threads in args.threads:
                sessions = sessions_for(models, ["fp32", *names], threads)
                base, *rest = session_times(sessions, args.rounds, args.stat)
                cells = " | ".join(f"{t:.3f} ({base / t:.2f}x)" for t in rest)
                rows.append(f"| {K} x {N} | {batch} | {threads} | {base:.3f} | {cells} |")
                print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
