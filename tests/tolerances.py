"""Numerical tolerances shared by every test, per dtype, in one place.

Errors are measured as a relative L2 norm, ||actual - expected|| / ||expected||, which is stable across shapes
and scales where elementwise relative errors are not (outputs near zero).
"""

from __future__ import annotations

import numpy as np

# Exact rewrites and kernels (Winograd, FFT, ...) against a reference: round-off of the dtype, with headroom
# for reductions over a few thousand terms.
REL_L2: dict[np.dtype, float] = {
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float32): 1e-5,
    np.dtype(np.float16): 1e-2,
}

# Winograd F(4x4, 3x3): its transforms carry coefficients up to 8 (A^T) and 1/24 (G), which amplify fp32
# round-off about tenfold over F(2x2); the bound for it.
WINOGRAD_F4: dict[np.dtype, float] = {np.dtype(np.float32): 1e-4}

# FFT convolution (FFTConv) against direct convolution, float32: the FFT's round-off grows with log2 of the
# tile size and with the channel sum; measured ~3e-7 on the test shapes, so 1e-5 with headroom.
REL_L2_FFT = 1e-5

# FastfoodMatMul against its float64 reference, float32: each block's two fast Walsh-Hadamard transforms add
# log2 n rounding steps per value (24 per block at n = 4096), depths 1 and 2; 1e-5 as the issue asks.
REL_L2_FWHT = 1e-5

# Two computations that must agree to the last bits but may differ in summation order (thread count).
REL_L2_REORDER: dict[np.dtype, float] = {
    np.dtype(np.float64): 1e-14,
    np.dtype(np.float32): 1e-6,
    np.dtype(np.float16): 1e-3,
}


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| in float64 (absolute error when expected is all zeros)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: actual {a.shape} vs expected {e.shape}")
    den = float(np.linalg.norm(e))
    num = float(np.linalg.norm(a - e))
    return num / den if den > 0 else num


def tol(dtype: np.dtype | type, table: dict[np.dtype, float] = REL_L2) -> float:
    """The tolerance of `table` for `dtype`."""
    return table[np.dtype(dtype)]
