"""SparseGemm and SparseConv on block-pruned weights: the blocked (BSR) paths against the CSR paths and
onnxruntime's dense MatMul / Conv.

Each layer's weight is pruned in aligned R x C blocks (R outputs by C consecutive inputs, the `prune` pass's
`prune.pattern=RxC`; kept blocks chosen at random, seeded) to each sparsity. The same sparse model runs twice:
in a session created with ONNXOPT_SPARSE_FORMAT=csr (the CSR kernels) and in one created with the default
(auto: the kernels detect the blocks and run the blocked kernels, prune_block.h). One-node models, A/B
interleaved in one process (dense, then CSR and blocked at each sparsity), a 64 MiB buffer touched before
every run, median of --rounds runs (onnxopt.timing.session_times), at 1 and 2 threads; each figure the median
of --passes sweeps. Cells: ms (dense ms / ms; > 1: faster than dense); "blk/csr": CSR ms / blocked ms.

--fill: where blocks stop paying: FC 4x1 blocks at 90% with a fraction of each block's entries zeroed; the
CSR of the nonzeros against the blocks stored whole (explicit zeros: what the blocked kernels stream at that
fill, and what they would choose below kMinFill = 0.75 if allowed).

Run from the repo root after scripts/setup.sh:  .venv/bin/python benchmarks/prune_blocked.py [--rounds 15]
[--fill]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fc import K, N, dense_model  # noqa: E402
from benchmarks.prune import _csr_inits, _model  # noqa: E402
from onnxopt import DOMAIN  # noqa: E402
from onnxopt.library import session_for  # noqa: E402
from onnxopt.timing import session_times  # noqa: E402

FC_SPARSITIES = (0.7, 0.9, 0.95)
CONV_SPARSITIES = (0.7, 0.9)


def block_prune(rows: np.ndarray, sparsity: float, r: int, c: int, seed: int) -> np.ndarray:
    """rows (outputs x inputs) with a random `sparsity` fraction of its aligned r x c blocks zeroed."""
    n, k = rows.shape
    keep = np.random.default_rng(seed).random((n // r, k // c)) >= sparsity
    return rows * np.kron(keep, np.ones((r, c), dtype=rows.dtype))


def fc_models(batch: int, r: int, c: int) -> list[onnx.ModelProto]:
    """Dense MatMul (benchmarks/fc.py's weight), then SparseGemm of it block-pruned to each sparsity."""
    dense = dense_model(batch)
    W = numpy_helper.to_array(dense.graph.initializer[0])
    models = [dense]
    for s in FC_SPARSITIES:
        node = helper.make_node(
            "SparseGemm", ["X", "values", "indices", "row_ptr"], ["Y"], domain=DOMAIN, K=K
        )
        models.append(_model(node, [batch, K], _csr_inits(block_prune(W.T, s, r, c, 1))))
    return models


def conv_models(cin: int, m: int, hw: int, r: int, c: int) -> list[onnx.ModelProto]:
    """Dense 1x1 Conv cin -> m at hw x hw, batch 1, then SparseConv of it block-pruned to each sparsity."""
    rng = np.random.default_rng(cin * 1000 + m)
    W = (rng.standard_normal((m, cin, 1, 1)) * np.sqrt(2 / cin)).astype(np.float32)
    B = rng.standard_normal(m).astype(np.float32)
    x_shape = [1, cin, hw, hw]
    dense = helper.make_node("Conv", ["X", "W", "B"], ["Y"], kernel_shape=[1, 1])
    models = [_model(dense, x_shape, [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")])]
    for s in CONV_SPARSITIES:
        node = helper.make_node(
            "SparseConv",
            ["X", "values", "indices", "row_ptr", "B"],
            ["Y"],
            domain=DOMAIN,
            C=cin,
            kernel_shape=[1, 1],
        )
        pruned = block_prune(W.reshape(m, cin), s, r, c, 2)
        models.append(_model(node, x_shape, [*_csr_inits(pruned), numpy_helper.from_array(B, "B")]))
    return models


LAYERS = [  # (label, batch, pattern (r, c), sparsities, models factory)
    *[
        (f"FC {K}x{N}", b, p, FC_SPARSITIES, lambda b=b, p=p: fc_models(b, *p))
        for b in (1, 32)
        for p in ((4, 1), (8, 1), (1, 4))
    ],
    *[
        (
            f"1x1 conv {ci}->{co} @{hw}x{hw}",
            1,
            (4, 1),
            CONV_SPARSITIES,
            lambda ci=ci, co=co, hw=hw: conv_models(ci, co, hw, 4, 1),
        )
        for ci, co, hw in ((256, 64, 56), (64, 256, 56), (512, 512, 14))
    ],
]


FILLS = (1.0, 0.875, 0.75, 0.5, 0.375)


def csr_with_zeros(rows: np.ndarray, stored: np.ndarray) -> list[onnx.TensorProto]:
    """CSR inits of `rows` storing every entry where `stored` (explicit zeros included)."""
    r, c = np.nonzero(stored)
    row_ptr = np.zeros(rows.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(r, minlength=rows.shape[0]), out=row_ptr[1:])
    return [
        numpy_helper.from_array(rows[r, c].astype(np.float32), "values"),
        numpy_helper.from_array(c.astype(np.int32), "indices"),
        numpy_helper.from_array(row_ptr, "row_ptr"),
    ]


def fill_models(batch: int, sparsity: float) -> list[onnx.ModelProto]:
    """Where blocks stop paying: 4x1 blocks at `sparsity`, a fraction 1 - fill of each kept block's entries
    zeroed. Per fill: the CSR of the nonzeros, then the same weight storing its blocks whole (the missing
    entries as explicit zeros: what the blocked kernels stream at that fill; fill 1 to the kernels)."""
    dense = dense_model(batch)
    W = numpy_helper.to_array(dense.graph.initializer[0]).T
    blocks = block_prune(np.ones_like(W), sparsity, 4, 1, 1)
    node = helper.make_node("SparseGemm", ["X", "values", "indices", "row_ptr"], ["Y"], domain=DOMAIN, K=K)
    models = [dense]
    for f in FILLS:
        holes = np.random.default_rng(3).random(W.shape) >= f
        kept = W * blocks * ~holes
        models.append(_model(node, [batch, K], _csr_inits(kept)))
        models.append(_model(node, [batch, K], csr_with_zeros(kept, blocks > 0)))
    return models


def fill_table(rounds: int, passes: int) -> list[str]:
    """dense ms, then per fill: CSR of the nonzeros (forced CSR) against the whole blocks (blocked)."""
    head = " | ".join(f"fill {f}: CSR ms | blocked ms | blk/csr" for f in FILLS)
    rows = [f"| FC {K}x{N} 4x1 | batch | threads | dense ms | {head} |", "|---" * (4 + 3 * len(FILLS)) + "|"]
    for batch, sparsity in ((1, 0.9), (32, 0.9)):
        models = fill_models(batch, sparsity)
        for threads in (1, 2):
            runs = []
            for _ in range(passes):
                made = [session_for(models[0], threads, spin=False)]
                for i in range(len(FILLS)):
                    os.environ["ONNXOPT_SPARSE_FORMAT"] = "csr"
                    try:
                        made.append(session_for(models[1 + 2 * i], threads, spin=False))
                    finally:
                        del os.environ["ONNXOPT_SPARSE_FORMAT"]
                    made.append(session_for(models[2 + 2 * i], threads, spin=False))
                runs.append(session_times(made, rounds))
            dense, *t = np.median(np.array(runs), axis=0)
            cells = " | ".join(
                f"{t[2 * i]:.3f} | {t[2 * i + 1]:.3f} | {t[2 * i] / t[2 * i + 1]:.2f}"
                for i in range(len(FILLS))
            )
            rows.append(f"| {round(sparsity * 100)}% | {batch} | {threads} | {dense:.3f} | {cells} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def sessions(models: list[onnx.ModelProto], threads: int) -> list:
    """dense, then per sparse model its CSR session (ONNXOPT_SPARSE_FORMAT=csr) and its default one."""
    out = [session_for(models[0], threads, spin=False)]
    for m in models[1:]:
        os.environ["ONNXOPT_SPARSE_FORMAT"] = "csr"  # read at kernel creation
        try:
            out.append(session_for(m, threads, spin=False))
        finally:
            del os.environ["ONNXOPT_SPARSE_FORMAT"]
        out.append(session_for(m, threads, spin=False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--only", help="substring of the layer labels to run")
    ap.add_argument("--fill", action="store_true", help="only the table of block fill (where blocks pay)")
    args = ap.parse_args()
    os.environ.pop("ONNXOPT_SPARSE_FORMAT", None)
    if args.fill:
        print("\n".join(fill_table(args.rounds, args.passes)))
        return
    layers = [row for row in LAYERS if not args.only or args.only in row[0]]
    times: dict[tuple[int, int], list[list[float]]] = {}
    for _ in range(args.passes):
        for i, (_, _, _, _, factory) in enumerate(layers):
            models = factory()
            for threads in (1, 2):
                times.setdefault((i, threads), []).append(
                    session_times(sessions(models, threads), args.rounds)
                )
    head = " | ".join(
        f"{round(s * 100)}% CSR ms (x) | {round(s * 100)}% blocked ms (x) | blk/csr" for s in FC_SPARSITIES
    )
    rows = [
        f"| layer | batch | blocks | threads | dense ms | {head} |",
        "|---" * (5 + 3 * len(FC_SPARSITIES)) + "|",
    ]
    for i, (label, batch, (r, c), sparsities, _) in enumerate(layers):
        for threads in (1, 2):
            dense, *sparse = np.median(np.array(times[i, threads]), axis=0)
            cells = []
            for j in range(len(sparsities)):
                csr, blk = sparse[2 * j], sparse[2 * j + 1]
                cells.append(
                    f"{csr:.3f} ({dense / csr:.2f}x) | {blk:.3f} ({dense / blk:.2f}x) | {csr / blk:.2f}"
                )
            cells += ["- | - | -"] * (len(FC_SPARSITIES) - len(sparsities))
            rows.append(f"| {label} | {batch} | {r}x{c} | {threads} | {dense:.3f} | {' | '.join(cells)} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
