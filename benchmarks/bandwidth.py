"""Streaming-read bandwidth of this machine and the floor it puts under batch-1 LowBitMatMul.

A batch-1 FC layer reads every weight byte once per call, so no kernel runs faster than (bytes it reads) /
(read bandwidth). benchmarks/read_bandwidth.c measures that bandwidth the way the kernel benchmarks run: a
64 MiB buffer written before every run (cache flushed), the same bytes read with 256-bit loads and no
compute, at 1 and 2 threads, on 4 KiB pages and on 2 MiB transparent huge pages (where LowBitMatMul keeps
codes of 4 MiB and more); best and median of 25 runs. For each layer this prints the bytes LowBitMatMul
4-bit G128 act_bits=8 reads per call (codes K N / 2, plus a float32 scale and a uint8 zero point per group
and column) and the time floor at the measured median bandwidth.

Run from the repo root (needs gcc; under the machine's benchmark lock):
    flock /tmp/onnxopt-bench.lock .venv/bin/python benchmarks/bandwidth.py [--shapes 4096x4096 25088x4096]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("read_bandwidth.c")
STEADY_BYTES = 512 << 20  # far beyond the 32 MiB L3: the DRAM figure


def lowbit_bytes(K: int, N: int, group: int = 128) -> int:
    """Bytes one batch-1 act_bits=8 LowBitMatMul call reads at 4 bits on AVX-512: the codes, plus a float32
    scale and a uint8 zero point per group and column (N padded to 4 columns). The x row (K bytes) stays in
    L1."""
    kp = -(-K // group) * group
    np_ = -(-N // 4) * 4
    return np_ * kp // 2 + 5 * np_ * (kp // group)


def measure(threads: int, huge: bool, sizes: list[int]) -> list[tuple[float, float]]:
    """(best GB/s, median GB/s) of reading each of `sizes` bytes at `threads` threads, in order."""
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "read_bandwidth"
        subprocess.run(["gcc", "-O2", "-mavx2", "-pthread", str(SOURCE), "-o", str(exe)], check=True)
        cmd = [str(exe), str(threads), str(int(huge)), *map(str, sizes)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return [
        (float(best), float(median))
        for _, _, best, median in (line.split() for line in out.stdout.splitlines())
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "25088x4096"], help="KxN of the layer")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    args = ap.parse_args()
    layers = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    sizes = [STEADY_BYTES] + [lowbit_bytes(K, N) for K, N in layers]
    labels = ["512 MiB (steady state)"] + [
        f"{K} x {N} 4b G128 a8: {lowbit_bytes(K, N) / 1e6:.1f} MB" for K, N in layers
    ]
    rows = [
        "| bytes read | pages | threads | best GB/s | median GB/s | floor ms (at the median) |",
        "|---|---|---|---|---|---|",
    ]
    for huge in (False, True):
        for threads in args.threads:
            for i, (best, median) in enumerate(measure(threads, huge, sizes)):
                floor = f"{sizes[i] / median / 1e6:.3f}" if i else ""
                page = "2 MiB" if huge else "4 KiB"
                rows.append(f"| {labels[i]} | {page} | {threads} | {best:.1f} | {median:.1f} | {floor} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
