"""The blocked (BSR) paths of SparseGemm and SparseConv (custom_ops/prune_block.h): weights pruned in aligned
R x C blocks (partial last row groups, groups with no block, holes inside blocks down to the fill threshold)
against the numpy references, in the AVX2 and portable builds, at batch sizes that take the gather (1, 3)
and tile (6, 13, 33) paths, 16- and 32-bit indices; the same model forced to CSR (ONNXOPT_SPARSE_FORMAT=csr)
agrees; and the exported onnxopt_sparse_block_shape, which runs the kernels' own choice, shows which format
a weight gets."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from kernels.test_prune import make_model, run

import onnxopt
from onnxopt.reference.prune import sparse_conv, sparse_gemm, to_csr
from tolerances import REL_L2, rel_l2

F32 = np.float32
TOL = REL_L2[np.dtype(F32)]


def block_pruned(
    rows: int, cols: int, r: int, c: int, density: float, seed: int, hole: float = 0.0
) -> np.ndarray:
    """A rows x cols weight (one row per output) whose nonzeros fill about `density` of its aligned r x c
    blocks (the last ones partial when r, c do not divide the shape), a `hole` fraction of their entries
    zero, and the first row group empty."""
    rng = np.random.default_rng(seed)
    keep = rng.random((-(-rows // r), -(-cols // c))) < density
    keep[0] = False
    mask = np.kron(keep, np.ones((r, c)))[:rows, :cols] * (rng.random((rows, cols)) >= hole)
    return (rng.standard_normal((rows, cols)) * mask).astype(F32)


def block_shape(csr, cols: int, conv: bool = False) -> tuple[int, int]:
    """(R, C) the kernels choose for this CSR (1, 1: CSR), through the library's exported query."""
    lib = ctypes.CDLL(onnxopt.get_library_path())
    _, indices, row_ptr = csr
    out = (ctypes.c_int64 * 2)()
    rc = lib.onnxopt_sparse_block_shape(
        indices.ctypes.data_as(ctypes.c_void_p),
        row_ptr.ctypes.data_as(ctypes.c_void_p),
        ctypes.c_int64(len(row_ptr) - 1),
        ctypes.c_int64(cols),
        ctypes.c_int(int(conv)),
        out,
    )
    assert rc == 0, "onnxopt_sparse_block_shape rejected a valid CSR"
    return out[0], out[1]


# (K, N, R, C, density, hole, leading shape of X): N not a multiple of R (a partial last group), batch 1 and
# 3 (gather), 6, 13, 33 (tiles of 8, 16, 32 + gathered rows); K = 70000 takes 32-bit indices.
GEMM_CASES = [
    (13, 37, 4, 1, 0.3, 0.0, (1,)),
    (100, 37, 4, 1, 0.2, 0.1, (3,)),
    (100, 37, 8, 1, 0.3, 0.0, (2, 3)),
    (37, 45, 8, 1, 0.5, 0.1, (33,)),
    (300, 29, 4, 1, 0.1, 0.0, (13,)),
    (64, 37, 1, 4, 0.3, 0.0, (1,)),
    (100, 13, 1, 4, 0.3, 0.1, (3,)),
    (128, 21, 1, 4, 0.2, 0.0, (33,)),
    (70000, 11, 4, 1, 0.01, 0.0, (3,)),
    (70000, 5, 1, 4, 0.01, 0.0, (6,)),
]


def gemm_id(case) -> str:
    K, N, R, C, d, hole, lead = case
    return f"K={K},N={N},{R}x{C},density={d},hole={hole},lead={list(lead)}"


@pytest.mark.parametrize("portable", [False, True], ids=["avx2", "portable"])
@pytest.mark.parametrize("case", GEMM_CASES, ids=[gemm_id(c) for c in GEMM_CASES])
def test_blocked_gemm_matches_reference(case, portable, monkeypatch):
    K, N, R, C, density, hole, lead = case
    if portable:
        monkeypatch.setenv("ONNXOPT_DISABLE_AVX2", "1")
    csr = to_csr(block_pruned(N, K, R, C, density, seed=K + N, hole=hole))
    assert block_shape(csr, K) == (R, C), f"{gemm_id(case)}: the kernels would not take the blocked path"
    rng = np.random.default_rng(K)
    B = rng.standard_normal(N).astype(F32)
    X = rng.standard_normal((*lead, K)).astype(F32)
    expected = sparse_gemm(X, *csr, B, K=K)
    model = make_model("SparseGemm", csr, B, x_shape=[f"d{i}" for i in range(len(lead))] + [K], K=K)
    for threads in (1, 2):
        Y = run(model, X, threads)
        assert Y.shape == (*lead, N), f"{gemm_id(case)}: shape {Y.shape}"
        err = rel_l2(Y, expected)
        assert err <= TOL, f"{gemm_id(case)} portable={portable} threads={threads}: rel L2 {err:.3e}"
    monkeypatch.setenv("ONNXOPT_SPARSE_FORMAT", "csr")
    err = rel_l2(run(model, X, 1), expected)
    assert err <= TOL, f"{gemm_id(case)} forced CSR: rel L2 {err:.3e}"


# (C, M, R, kernel, strides, pads, H, W, batch, density, hole): 1x1 in place (ragged tiles of 8 and 16,
# column blocks at C = 300), 1x1 strided (phase planes), kxk through offsets; M not a multiple of R.
CONV_CASES = [
    (13, 37, 4, (1, 1), (1, 1), (0, 0, 0, 0), 9, 7, 1, 0.3, 0.0),
    (300, 21, 4, (1, 1), (1, 1), (0, 0, 0, 0), 9, 7, 3, 0.3, 0.1),
    (7, 22, 8, (1, 1), (1, 1), (0, 0, 0, 0), 6, 6, 2, 0.5, 0.0),
    (7, 12, 4, (1, 1), (1, 1), (0, 0, 0, 0), 4, 11, 1, 0.5, 0.0),
    (32, 40, 8, (1, 1), (1, 1), (0, 0, 0, 0), 33, 31, 1, 0.1, 0.0),
    (5, 11, 4, (1, 1), (2, 2), (1, 0, 0, 1), 9, 7, 1, 0.6, 0.0),
    (16, 22, 4, (3, 3), (1, 1), (1, 1, 1, 1), 9, 7, 3, 0.2, 0.1),
    (6, 16, 8, (3, 3), (2, 1), (1, 1, 1, 1), 5, 5, 1, 0.5, 0.0),
]


def conv_id(case) -> str:
    C, M, R, k, s, p, H, W, n, d, hole = case
    return f"C={C},M={M},{R}x1,k={k[0]}x{k[1]},s={list(s)},p={list(p)},{H}x{W},n={n},density={d},hole={hole}"


@pytest.mark.parametrize("portable", [False, True], ids=["avx2", "portable"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[conv_id(c) for c in CONV_CASES])
def test_blocked_conv_matches_reference(case, portable, monkeypatch):
    C, M, R, k, s, p, H, W, n, density, hole = case
    if portable:
        monkeypatch.setenv("ONNXOPT_DISABLE_AVX2", "1")
    cols = C * k[0] * k[1]
    csr = to_csr(block_pruned(M, cols, R, 1, density, seed=C * 31 + M, hole=hole))
    assert block_shape(csr, cols, conv=True) == (R, 1), f"{conv_id(case)}: not the blocked path"
    rng = np.random.default_rng(M)
    B = rng.standard_normal(M).astype(F32)
    X = rng.standard_normal((n, C, H, W)).astype(F32)
    attrs = dict(C=C, kernel_shape=list(k), strides=list(s), pads=list(p))
    expected = sparse_conv(X, *csr, B, **attrs)
    model = make_model("SparseConv", csr, B, x_shape=[n, C, H, W], **attrs)
    for threads in (1, 2):
        err = rel_l2(run(model, X, threads), expected)
        assert err <= TOL, f"{conv_id(case)} portable={portable} threads={threads}: rel L2 {err:.3e}"


def test_block_shape_choice(monkeypatch):
    """The rule of prune_block.h: blocks whose fill reaches 0.75, the shape streaming the fewest bytes;
    unstructured weights, too few filled slots, 1 x C for SparseConv, or ONNXOPT_SPARSE_FORMAT=csr: CSR."""
    W4 = block_pruned(64, 64, 4, 1, 0.3, seed=1)
    assert block_shape(to_csr(W4), 64) == (4, 1)
    W8 = block_pruned(64, 64, 8, 1, 0.3, seed=2)
    assert block_shape(to_csr(W8), 64) == (8, 1)  # also 4x1 blocks, but 8x1 streams fewer index bytes
    W14 = block_pruned(64, 64, 1, 4, 0.3, seed=3)
    assert block_shape(to_csr(W14), 64) == (1, 4)
    assert block_shape(to_csr(W14), 64, conv=True) == (1, 1)  # SparseConv runs R x 1 blocks only
    assert block_shape(to_csr(block_pruned(64, 62, 1, 4, 0.3, seed=3)), 62) == (1, 1)  # 4 does not divide K
    holes = block_pruned(64, 64, 4, 1, 0.3, seed=4, hole=0.5)  # fill about 0.5
    assert block_shape(to_csr(holes), 64) == (1, 1)
    unstructured = (np.random.default_rng(5).random((64, 64)) < 0.3).astype(F32)
    assert block_shape(to_csr(unstructured), 64) == (1, 1)
    monkeypatch.setenv("ONNXOPT_SPARSE_FORMAT", "csr")
    assert block_shape(to_csr(W4), 64) == (1, 1)


def test_bad_sparse_format_setting(monkeypatch):
    csr = to_csr(block_pruned(8, 16, 4, 1, 0.5, seed=6))
    monkeypatch.setenv("ONNXOPT_SPARSE_FORMAT", "bsr")
    with pytest.raises(Exception, match="ONNXOPT_SPARSE_FORMAT must be csr or auto"):
        onnxopt.make_session(make_model("SparseGemm", csr, x_shape=[1, 16], K=16))
