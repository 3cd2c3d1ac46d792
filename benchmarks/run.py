"""Benchmarks against stock onnxruntime, written to BENCHMARKS.md.

1. Real models x methods: each model is optimized under the default budget (relative L2 error of every
   output <= 1e-2 on its calibration data), then size, FLOPs and latency are compared with the original in
   the same process (A/B interleaved, median, at 1 and 2 threads) and the task metric is measured.
2. Fast convolution (benchmarks/conv.py, depthwise.py, fftconv.py): WinogradConv, DepthwiseConv and FFTConv
   against onnxruntime's Conv (ORT_ENABLE_ALL) on single layers, batch 1, interleaved, with a 64 MiB buffer
   touched between runs so neither kernel reads its weights from a warm cache; and whole models optimized by
   the speed-only passes.

Each section replaces its own part of BENCHMARKS.md and leaves the others (and the memory section, from
benchmarks/memory.py) as they are.

Run from the repo root after scripts/setup.sh:
    .venv/bin/python benchmarks/run.py [--quick] [--sections models conv]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import onnx

# numpy's OpenBLAS threads spin after use and would take the second of the two cores from the timed runs.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import conv as conv_bench  # noqa: E402
from models import fashion_mnist, ocr  # noqa: E402
from onnxopt import make_session  # noqa: E402
from onnxopt.analysis import node_stats, totals  # noqa: E402
from onnxopt.bench import latency  # noqa: E402
from onnxopt.budget import OutputBudget  # noqa: E402
from onnxopt.data import dims_from_feeds, load_npz  # noqa: E402
from onnxopt.errors import BudgetError  # noqa: E402
from onnxopt.manager import optimize  # noqa: E402
from onnxopt.passes import make_passes  # noqa: E402

DATA = ROOT / "models" / "data"
MEMORY_SECTION = "## Memory on a large model"


def real_models(quick: bool) -> list[dict]:
    """name, model path, calibration file, metric (label, function, higher_is_better)."""
    paths = ocr.fetch()
    calib = DATA / "bench"
    n = 40 if quick else 200
    return [
        {
            "name": "fashion_mnist",
            "path": ROOT / "models" / "fashion_mnist.onnx",
            "calib": fashion_mnist.write_calibration(calib / "fmnist.npz", n=256),
            "metric": ("top-1 %", lambda s: fashion_mnist.top1(s, n=2000 if quick else None), True),
        },
        {
            "name": "ppocr_rec",
            "path": paths["rec"],
            "calib": ocr.write_calibration(calib / "rec.npz", n=16),
            "metric": ("CER %", lambda s: ocr.cer(s, n=n), False),
        },
        {
            "name": "ppocr_det",
            "path": paths["det"],
            "calib": ocr.write_det_calibration(calib / "det.npz", n=2),
            "metric": ("box IoU %", lambda s: ocr.det_iou(s, n=4 if quick else 8), True),
        },
        {
            "name": "ppocr_cls",
            "path": paths["cls"],
            "calib": ocr.write_cls_calibration(calib / "cls.npz", n=16),
            "metric": ("accuracy %", lambda s: ocr.cls_accuracy(s, n=n), True),
        },
    ]


def model_rows(quick: bool) -> list[list[str]]:
    rows = []
    for spec in real_models(quick):
        model = onnx.load(str(spec["path"]))
        feeds = load_npz(spec["calib"], model)
        label, metric, _ = spec["metric"]
        base_score = metric(make_session(model.SerializeToString()))
        dims = dims_from_feeds(model, feeds)
        before = totals(node_stats(model, dims))
        for method in ("lowrank",):  # the convolution methods: the conv section
            t0 = time.perf_counter()
            try:
                budget = OutputBudget(model, feeds, 1e-2)
                result = optimize(model, make_passes([method]), feeds, budget, dims=dims)
            except BudgetError as e:
                rows.append([spec["name"], method, "-", "-", "-", "-", f"budget not met: {e}"])
                continue
            secs = time.perf_counter() - t0
            applied = sum(r.status == "applied" for r in result.records)
            if not result.changed:
                rows.append(
                    [
                        spec["name"],
                        method,
                        "1.00x",
                        "1.00x",
                        "1.00x",
                        "1.00x",
                        f"{label} {base_score:.2f} (nothing rewritten)",
                    ]
                )
                continue
            after = totals(node_stats(result.model, dims))
            lat = {
                t: latency([model, result.model], feeds, threads=t, rounds=20 if quick else 60)
                for t in (1, 2)
            }
            score = metric(make_session(result.model.SerializeToString()))
            rows.append(
                [
                    spec["name"],
                    f"{method} ({applied} nodes, {secs:.0f}s)",
                    f"{model.ByteSize() / result.model.ByteSize():.2f}x",
                    f"{before['flops'] / max(after['flops'], 1):.2f}x",
                    *(f"{lat[t][0]['median_ms'] / lat[t][1]['median_ms']:.2f}x" for t in (1, 2)),
                    f"{label} {base_score:.2f} -> {score:.2f}; "
                    f"rel L2 {result.verification['worst_rel_l2']:.1e}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    return rows


def conv_section(quick: bool) -> str:
    rounds = 7 if quick else 21
    wino = md_table(conv_bench.WINOGRAD_HEADER, conv_bench.winograd_rows(rounds))
    depthwise, fft = (_script_table(name, "--rounds", str(rounds)) for name in ("depthwise.py", "fftconv.py"))
    e2e = md_table(conv_bench.E2E_HEADER, conv_bench.e2e_rows(["winograd", "fftconv", "depthwise"], quick))
    return f"""## Fast convolution

Single layers: onnxruntime's Conv (ORT_ENABLE_ALL) against the custom op as one-node models, batch 1, A/B
interleaved, median of {rounds} runs with a 64 MiB buffer touched before each run; speedup = ORT ms / custom
op ms. Sessions do not spin between runs (on 2 cores an idle session's spinning threads would steal the
timed one's cores).

### WinogradConv, 3x3 pad 1 (ResNet layers)

Each figure is the median of {conv_bench.PASSES} sweeps over the table, each a median of {rounds} runs.

{wino}

### DepthwiseConv, 3x3 pad 1 (MobileNetV2 layers): `benchmarks/depthwise.py`

{depthwise}

### FFTConv: `benchmarks/fftconv.py`

{fft}

### Whole models, optimized with `--methods winograd,fftconv,depthwise` at the thread count shown

Every candidate layer is timed alone against onnxruntime and rewritten only if faster; then the whole model
is timed and the rewrites are undone if it is not 1.05x faster. Budget: relative L2 <= 1e-3 (exact methods;
the error is fp32 round-off). Latency: whole model, original vs optimized, interleaved, median of
{conv_bench.PASSES} separate measurements of 20 runs each.

This machine is a shared VM with slow phases lasting seconds to minutes: single figures move by about 10%
between runs of this section, more at 2 threads.

{e2e}
"""


def _script_table(name: str, *args: str) -> str:
    """The markdown table a benchmark script prints on stdout."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args], check=True, capture_output=True, text=True
    ).stdout
    return "\n".join(line for line in out.splitlines() if line.startswith("|"))


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def models_section(quick: bool) -> str:
    models = model_rows(quick)
    return f"""## Real models, default budget (relative L2 error of every output <= 1e-2 on calibration data)

Latency is whole-model, batch of the calibration file's first sample, onnxruntime ORT_ENABLE_ALL with the
onnxopt library registered for both models.

{md_table(["model", "method", "size", "FLOPs", "latency 1 thread", "latency 2 threads", "accuracy"], models)}
"""


def lowrank_section(quick: bool) -> str:
    return f"""## lowrank: size against accuracy on the Fashion-MNIST classifier (`benchmarks/lowrank.py`)

Each row optimizes with `lowrank` under an output budget (relative L2 of the logits on 256 calibration
images; the default budget is 0.01) and measures top-1 on the 10,000 test images. "their bytes": the
rewritten layers' weights before / after; "file": the whole model. FC layers are always candidates; Conv
layers with `--set lowrank.conv=1`, restricted to one scheme with `--set lowrank.schemes=...`.

{_script_table("lowrank.py")}
"""


def structured_section(quick: bool) -> str:
    rounds = "7" if quick else "15"
    return f"""## Structured FC layers against dense MatMul, 4096 x 4096 (`benchmarks/structured.py`)

One-node models, onnxruntime ORT_ENABLE_ALL, A/B interleaved, cache flushed before every run, median of
{rounds} runs. "of byte ratio": the speedup as a fraction of the weight-bytes ratio (the issue asks at least
0.7 for lowrank rank 256 at batch 1).

{_script_table("structured.py", "--rounds", rounds)}

Circulant (`benchmarks/circulant.py`, `CirculantMatMul`; the issue asks full circulant >= 20x and block 64
>= 8x at batch 1):

{_script_table("circulant.py")}

Fastfood (`benchmarks/fastfood.py`, `FastfoodMatMul`, stacks of depth 1 and 4; the issue asks >= 10x at
batch 1):

{_script_table("fastfood.py")}

ACDC (`benchmarks/acdc.py`, `ACDCMatMul`, stacks of depth 1, 4 and 8 with permutations and bias; the issue
sets no speed goal for it):

{_script_table("acdc.py")}
"""


def sparse_section(quick: bool) -> str:
    rounds = "7" if quick else "15"
    return f"""## Sparse kernels against dense onnxruntime (`benchmarks/prune.py`)

SparseGemm and SparseConv, the `prune` method's ops, on weights pruned at random (seeded, unstructured) to
70%, 90% and 95% sparsity, against onnxruntime's dense MatMul / Conv (ORT_ENABLE_ALL) on the same shapes:
one-node models, A/B interleaved, a 64 MiB buffer touched before every run, median of {rounds} runs, each
figure the median of 3 sweeps. The issue's goals: FC 4096 x 4096 batch 1 >= 1.5x / 3x / 5x at 70 / 90 / 95%;
1x1 conv >= 1.3x at 70% and 2x at 90%; 3x3 conv 128@28x28 >= 1.5x at 90%.

{_script_table("prune.py", "--rounds", rounds)}

Block-pruned weights (`benchmarks/prune_blocked.py`): the same layers pruned in aligned R x C blocks (R
outputs by C consecutive inputs, `prune.pattern=RxC`), each sparse model run by the CSR kernels (a session
made with ONNXOPT_SPARSE_FORMAT=csr) and by the blocked kernels the ops choose by default (prune_block.h),
against dense; blk/csr = CSR ms / blocked ms.

{_script_table("prune_blocked.py", "--rounds", rounds)}
"""


def lowbit_section(quick: bool) -> str:
    rounds = "7" if quick else "15"
    return f"""## lowbit: weight-only 2/3/4-bit FC and Conv layers (`benchmarks/lowbit*.py`)

LowBitMatMul (group-wise codes, float32 scale and uint8 zero point per group) on one FC layer against
onnxruntime's fp32 MatMul, its MatMulNBits (com.microsoft, 4 bits, block 32, with zero points; accuracy_level
0 and 4) and its int8 (quantize_dynamic of the same MatMul): one-node models, A/B interleaved, a 64 MiB buffer
touched before every run, median of {rounds} runs; ratios are fp32 time / other time. The issue's goal:
>= 3x fp32 at batch 1 for 4 bits.

{_script_table("lowbit.py", "--rounds", rounds)}

"a8" is act_bits=8 (rows quantized to int8, integer dot products: AVX-512 VNNI where the CPU has it);
columns ending in "avx2" are the same layer with its kernel created under ONNXOPT_DISABLE_AVX512=1. A batch-1
layer reads all its bytes once per call, so the machine's read bandwidth (`benchmarks/bandwidth.py`: cache
flushed as above, best and median of 25 runs) puts a floor under it; the codes sit on 2 MiB pages:

{_script_table("bandwidth.py")}

LowBitConv (the same codes per output filter, along C kh kw) on one Conv layer at batch 1 against
onnxruntime's fp32 Conv and its int8 QLinearConv (quantize_static, QOperator, per-channel int8 weights),
same protocol.
Convs are compute-bound: the codes save memory, not time.

{_script_table("lowbit_conv.py", "--rounds", rounds)}

Accuracy on Fashion-MNIST's FC layers, RTN against GPTQ rounding (top-1 on the 10,000 test images; the
estimated error is the layer's relative output error on held-out calibration rows). The issue's goals: GPTQ at
4 bits loses <= 0.5 points; GPTQ's error is below RTN's at 3 and 2 bits.

{_script_table("lowbit_accuracy.py")}

The same on its Convs (conv2-conv4; conv1's 9 weights per filter are declined):

{_script_table("lowbit_accuracy.py", "--layers", "conv")}
"""


def binary_section(quick: bool) -> str:
    rounds = "7" if quick else "21"
    return f"""## binary: 1-bit weights, XNOR-popcount layers (`benchmarks/binary.py`, `binary_accuracy.py`)

BinaryMatMul (full: binary weights and activations, W1A1; k-bit activations W1A2-A4, bit-serial; partial:
binary weights, float activations) and BinaryConv (full and k-bit, 3x3, pad 1) against onnxruntime's fp32
MatMul and Conv at batch 1: one-node models, A/B interleaved, a 64 MiB buffer touched before every run, median
of {rounds} runs; ratios are fp32 time / binary time. The count loops use AVX-512 VPOPCNTDQ where the CPU has
it (else AVX2's nibble lookup). The issue's goals: full 3x3 conv 64@56x56 and 128@28x28 >= 4x, Gemm
1x4096x4096 >= 10x at one thread; weights 32x smaller.

{_script_table("binary.py", "--rounds", rounds)}

Post-training binarization of Fashion-MNIST (no retraining; top-1 on the 10,000 test images; the estimated
error is the layer's relative output error on calibration inputs).

{_script_table("binary_accuracy.py", "--only", "xnor")}

k-bit activations with binary weights (DoReFa-style codes in a calibrated clipped range):

{_script_table("binary_accuracy.py", "--only", "kbit")}

What the pass keeps with its default options, at the default budget and at top-1 drops of 0.5 and 2 points:

{_script_table("binary_accuracy.py", "--only", "budget")}
"""


SECTIONS = {
    "models": models_section,
    "conv": conv_section,
    "lowrank": lowrank_section,
    "structured": structured_section,
    "sparse": sparse_section,
    "lowbit": lowbit_section,
    "binary": binary_section,
}


def _split(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(preamble, [(title line, whole section text)]) of a markdown file, by level-2 headings."""
    parts = text.split("\n## ")
    return parts[0], [(p.splitlines()[0], "## " + p.rstrip() + "\n") for p in parts[1:]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and smaller evaluation sets")
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    new = {name: SECTIONS[name](args.quick) for name in args.sections}
    cmd = "bash scripts/setup.sh && .venv/bin/python benchmarks/run.py" + (" --quick" if args.quick else "")
    ort_version = __import__("onnxruntime").__version__
    head = f"""# Benchmarks

Sections are produced by `{cmd} --sections <name>` (names: {", ".join(SECTIONS)};
the memory section by benchmarks/memory.py) on this machine ({platform.machine()}, onnxruntime
{ort_version}); each section says when it was last run. Every ratio is original / optimized measured in
the same process, A/B interleaved, median of many runs; above 1 means onnxopt is better.
"""
    out = Path(args.out)
    _, old = _split(out.read_text()) if out.exists() else ("", [])
    stamp = f"\n_Last run: {date.today()}, `--sections {{name}}`{' --quick' if args.quick else ''}._\n"
    generated = {  # title line (without "## ") -> section text
        text.splitlines()[0][3:]: text.rstrip() + "\n" + stamp.format(name=name) for name, text in new.items()
    }
    sections = [generated.pop(title, text) for title, text in old]  # in place, where the file has them
    sections += list(generated.values())  # new ones at the end
    out.write_text(head + "\n" + "\n".join(sections))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
