"""Peak memory of `onnxopt optimize` on a large model, against the size of the model file.

Builds an MLP of 2048-wide layers (each weight of rank 128 plus 1e-4 noise, so lowrank rewrites it) of about
`--mb` MB,
runs `onnxopt optimize --methods lowrank` on it in a child process, and reports the child's peak RSS
divided by the file size (the goal: under 3x for a 500 MB model).

    .venv/bin/python benchmarks/memory.py --mb 500
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from models.synthetic import mlp  # noqa: E402


def big_mlp(width: int, layers: int, rank: int = 128) -> onnx.ModelProto:
    """mlp() topology with cheap-to-make compressible weights (QR-based spectra take minutes at this size)."""
    model = mlp([8] * (layers + 1), seed=0)  # the graph; weights replaced below
    rng = np.random.default_rng(0)
    for t in model.graph.initializer:
        if t.name.startswith("W"):
            a = rng.standard_normal((width, rank), dtype=np.float32) / np.sqrt(width)
            b = rng.standard_normal((rank, width), dtype=np.float32) * np.sqrt(2.0 / rank)
            w = (a @ b + 1e-4 * rng.standard_normal((width, width))).astype(np.float32)
        else:
            w = (0.1 * rng.standard_normal(width)).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(w, t.name))
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.shape.dim[1].dim_value = width
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--width", type=int, default=2048)
    args = ap.parse_args()
    layers = max(1, round(args.mb * 2**20 / (4 * args.width * args.width)))
    with tempfile.TemporaryDirectory(dir=ROOT / "out" if (ROOT / "out").is_dir() else None) as tmp:
        src, out = Path(tmp) / "big.onnx", Path(tmp) / "big.opt.onnx"
        onnx.save(big_mlp(args.width, layers), str(src))
        size = src.stat().st_size
        cmd = [
            str(ROOT / ".venv" / "bin" / "onnxopt"),
            "-q",
            "optimize",
            str(src),
            "-o",
            str(out),
            "--methods",
            "lowrank",
            "--no-bench",
            "--samples",
            "16",
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        secs = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(
            f"model {size / 2**20:.0f} MiB ({layers} layers {args.width}x{args.width}); optimized "
            f"{out.stat().st_size / 2**20:.0f} MiB in {secs:.0f} s; peak RSS {peak / 2**20:.0f} MiB = "
            f"{peak / size:.2f}x the file size"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
