"""The blocked (BSR) paths of SparseGemm and SparseConv (custom_ops/prune_block.h): weights pruned in aligned
R x C blocks (partial last row groups, groups with no block, holes inside blocks down to the fill threshold)
against the numpy references, in the AVX2 and portable builds, at batch sizes that take the gather (1, 3)
and tile (6, 13, 33) paths, 16- and 32-bit indices; the same model forced to CSR (ONNXOPT_SPARSE_FORMAT=csr)
agrees. Which path ran is seen from outside: the blocked kernels store a block's missing entries as zeros and
multiply them (an input of inf turns that output NaN), the CSR kernels never read them (blocked_ran)."""

from __future__ import annotations

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


def add_probe(W: np.ndarray, r: int, c: int, area: int = 1) -> tuple[np.ndarray, int, int]:
    """W with one probe (row n, input channel q): a channel whose `area` columns row n stores nowhere while
    its blocks do (another row of n's group, or another column of n's 1 x c block, stores one of them), q > 0.
    Blocked kernels then multiply a stored zero by X[..., q]; CSR kernels never read it for row n."""
    W = W.copy()
    for n, col in zip(*np.nonzero(W), strict=True):
        q = col // area
        cols = slice(q * area, (q + 1) * area)
        if q == 0 or (
            r > 1 and np.count_nonzero(W[n // r * r : n // r * r + r, cols]) <= np.count_nonzero(W[n, cols])
        ):
            continue
        if c > 1 and np.count_nonzero(W[n, col // c * c : col // c * c + c]) < 2:
            continue
        W[n, cols] = 0
        return W, int(n), int(q)
    raise AssertionError("no probe position in this weight")


def blocked_ran(
    model: bytes,
    x_shape: tuple[int, ...],
    n: int,
    q: int,
    monkeypatch,
    conv: bool = False,
    every: bool = True,
) -> bool:
    """Whether the op ran its blocked kernels: with X[..., q] (channel q of SparseConv) = inf, output n is NaN
    (a stored zero times inf) for every X row (every=False: for some; SparseGemm runs 1 x C blocks only for
    its gathered rows), while the same model forced to CSR keeps it finite."""
    X = np.ones(x_shape, F32)
    if conv:
        X[:, q] = np.inf
    else:
        X[..., q] = np.inf

    def row(Y):
        return Y[:, n] if conv else Y[..., n]

    nan = np.isnan(row(run(model, X, 1)))
    blocked = nan.all() if every else nan.any()
    monkeypatch.setenv("ONNXOPT_SPARSE_FORMAT", "csr")
    csr = np.isfinite(row(run(model, X, 1))).all()
    monkeypatch.delenv("ONNXOPT_SPARSE_FORMAT")
    assert csr, "the CSR kernels read an input their row does not store"
    return bool(blocked)


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
    (70000, 5, 1, 4, 0.01, 0.0, (34,)),
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
    W, n, q = add_probe(block_pruned(N, K, R, C, density, seed=K + N, hole=hole), R, C)
    csr = to_csr(W)
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
    monkeypatch.delenv("ONNXOPT_SPARSE_FORMAT")
    ran = blocked_ran(model, X.shape, n, q, monkeypatch, every=C == 1)
    assert ran, f"{gemm_id(case)}: the blocked path did not run"


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
    Wt, m, q = add_probe(block_pruned(M, cols, R, 1, density, seed=C * 31 + M, hole=hole), R, 1, k[0] * k[1])
    csr = to_csr(Wt)
    rng = np.random.default_rng(M)
    B = rng.standard_normal(M).astype(F32)
    X = rng.standard_normal((n, C, H, W)).astype(F32)
    attrs = dict(C=C, kernel_shape=list(k), strides=list(s), pads=list(p))
    expected = sparse_conv(X, *csr, B, **attrs)
    model = make_model("SparseConv", csr, B, x_shape=[n, C, H, W], **attrs)
    for threads in (1, 2):
        err = rel_l2(run(model, X, threads), expected)
        assert err <= TOL, f"{conv_id(case)} portable={portable} threads={threads}: rel L2 {err:.3e}"
    # every=False: outputs reading only padding stay finite
    assert blocked_ran(model, X.shape, m, q, monkeypatch, conv=True, every=False), (
        f"{conv_id(case)}: the blocked path did not run"
    )


def gemm_blocked_ran(W: np.ndarray, r: int, c: int, monkeypatch) -> bool:
    W, n, q = add_probe(W, r, c)
    K = W.shape[1]
    return blocked_ran(make_model("SparseGemm", to_csr(W), x_shape=[1, K], K=K), (1, K), n, q, monkeypatch)


def test_format_choice(monkeypatch):
    """The rule of prune_block.h: blocks whose fill reaches 0.75 run blocked; unstructured weights, blocks
    half empty, 1 x C blocks whose C does not divide K, or ONNXOPT_SPARSE_FORMAT=csr run CSR."""
    for r, c in ((4, 1), (8, 1), (1, 4)):
        assert gemm_blocked_ran(block_pruned(64, 64, r, c, 0.3, seed=r + c), r, c, monkeypatch), f"{r}x{c}"
    assert not gemm_blocked_ran(block_pruned(64, 62, 1, 4, 0.3, seed=3), 1, 4, monkeypatch)
    assert not gemm_blocked_ran(block_pruned(64, 64, 4, 1, 0.3, seed=4, hole=0.5), 4, 1, monkeypatch)
    unstructured = np.random.default_rng(5).standard_normal((64, 64)).astype(F32)
    unstructured *= np.random.default_rng(6).random((64, 64)) < 0.3
    assert not gemm_blocked_ran(unstructured, 4, 1, monkeypatch)
    monkeypatch.setenv("ONNXOPT_SPARSE_FORMAT", "auto")
    assert gemm_blocked_ran(block_pruned(64, 64, 4, 1, 0.3, seed=7), 4, 1, monkeypatch)


def test_conv_keeps_csr_for_input_blocks(monkeypatch):
    """SparseConv runs R x 1 blocks only: a 1x4-blocked 1x1 conv weight stays CSR."""
    W, m, q = add_probe(block_pruned(12, 16, 1, 4, 0.5, seed=8), 1, 4)
    model = make_model("SparseConv", to_csr(W), x_shape=[1, 16, 6, 6], C=16, kernel_shape=[1, 1])
    assert not blocked_ran(model, (1, 16, 6, 6), m, q, monkeypatch, conv=True)


def test_bad_sparse_format_setting(monkeypatch):
    csr = to_csr(block_pruned(8, 16, 4, 1, 0.5, seed=6))
    monkeypatch.setenv("ONNXOPT_SPARSE_FORMAT", "bsr")
    with pytest.raises(Exception, match="ONNXOPT_SPARSE_FORMAT must be csr or auto"):
        onnxopt.make_session(make_model("SparseGemm", csr, x_shape=[1, 16], K=16))
