"""Numpy reference of WinogradConv: a 3x3, stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3)
or F(4x4, 3x3) (attribute `tile` = 2 or 4, the output tile edge).

Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016). The output is cut into 2x2
tiles; tile (ty, tx) reads the 4x4 window of the zero-padded input whose top-left corner is (2 ty, 2 tx), so
neighbouring windows overlap by 2. For a 3x3 filter g and a 4x4 input window d the 2x2 output tile is

    Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A

with ⊙ the elementwise product and

    B^T = [[1,  0, -1,  0],        G = [[1,    0,    0  ],        A^T = [[1, 1,  1,  0],
           [0,  1,  1,  0],             [1/2,  1/2,  1/2],               [0, 1, -1, -1]]
           [0, -1,  1,  0],             [1/2, -1/2,  1/2],
           [0,  1,  0, -1]]             [0,    0,    1  ]]

Summed over the C input channels, and because the transforms are linear, the elementwise products become
16 independent matrix products, one per position (xi, nu) of the 4x4 transformed tile:

    U[xi, nu, m, c]    = (G W[m, c] G^T)[xi, nu]                  (weights, transformed once)
    V[xi, nu, c, t]    = (B^T d[c, t] B)[xi, nu]                  (input tile t of channel c)
    Mt[xi, nu, m, t]   = sum_c U[xi, nu, m, c] V[xi, nu, c, t]      (16 GEMMs)
    Y[m, tile t]       = A^T Mt[:, :, m, t] A + B[m]

F(4x4, 3x3) is the same with 6x6 input windows at stride 4, 36 GEMMs (4x fewer multiplications than direct
convolution instead of 2.25x), and the matrices B4^T, G4, A4^T below (interpolation points 0, ±1, ±2, ∞). Its
transforms have larger coefficients, so its round-off is about 10x that of F(2x2).

Tiles that stick out of the output at the right or bottom edge (odd output sizes) are computed over zeros and
cropped. The result equals ONNX Conv(X, W, B, pads, kernel_shape=[3, 3], strides=1, dilations=1, group=1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx.reference.op_run import OpRun

from onnxopt.ops import OpSpec

# F(2x2, 3x3) transform matrices (see the module docstring).
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)

# F(4x4, 3x3).
BT4 = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=np.float64,
)
G4 = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=np.float64,
)
AT4 = np.array(
    [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=np.float64
)

# Output tile edge -> (B^T, G, A^T).
MATRICES = {2: (BT, G, AT), 4: (BT4, G4, AT4)}


def _matrices(tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if tile not in MATRICES:
        raise ValueError(f"tile must be 2 or 4 (F(2x2,3x3) or F(4x4,3x3)), got {tile}")
    return MATRICES[tile]


def transform_weights(W: np.ndarray, dtype: np.dtype | type = np.float32, tile: int = 2) -> np.ndarray:
    """U = G g G^T for every filter g = W[m, c]: [M, C, 3, 3] -> [a, a, M, C], a = tile + 2 (in float64)."""
    W = np.asarray(W)
    if W.ndim != 4 or W.shape[2:] != (3, 3):
        raise ValueError(f"W must have shape [M, C, 3, 3], got {list(W.shape)}")
    g = _matrices(tile)[1]
    U = np.einsum("ij,mcjk,lk->ilmc", g, W.astype(np.float64), g, optimize=True)
    return U.astype(dtype)


def _check(X: np.ndarray, W: np.ndarray, B: np.ndarray | None, pads: Sequence[int]) -> tuple[int, ...]:
    if X.ndim != 4:
        raise ValueError(f"X must have rank 4 [N, C, H, W], got shape {list(X.shape)}")
    if W.ndim != 4 or W.shape[2:] != (3, 3) or W.shape[0] < 1 or W.shape[1] < 1:
        raise ValueError(f"W must have shape [M, C, 3, 3] with M, C >= 1, got {list(W.shape)}")
    if X.shape[1] != W.shape[1]:
        raise ValueError(
            f"X has {X.shape[1]} channels (shape {list(X.shape)}) but W expects C = {W.shape[1]}"
        )
    if B is not None and B.shape != (W.shape[0],):
        raise ValueError(f"B must have shape [{W.shape[0]}], got {list(B.shape)}")
    pads = tuple(int(p) for p in pads)
    if len(pads) != 4 or min(pads) < 0:
        raise ValueError(f"pads must be 4 non-negative ints [top, left, bottom, right], got {list(pads)}")
    return pads


def winograd_conv(
    X: np.ndarray,
    W: np.ndarray,
    B: np.ndarray | None = None,
    pads: Sequence[int] = (0, 0, 0, 0),
    tile: int = 2,
) -> np.ndarray:
    """Y = Conv(X, W, B, pads) for 3x3 filters, stride 1, computed tile by tile with F(tile x tile, 3x3).

    X [N, C, H, W], W [M, C, 3, 3], B [M] or None, pads [top, left, bottom, right].
    Returns Y [N, M, H + top + bottom - 2, W + left + right - 2] in X's dtype (arithmetic in float64).
    """
    X, W = np.asarray(X), np.asarray(W)
    B = None if B is None else np.asarray(B)
    top, left, bottom, right = _check(X, W, B, pads)
    N, C, H, Wd = X.shape
    M = W.shape[0]
    OH, OW = H + top + bottom - 2, Wd + left + right - 2
    if OH <= 0 or OW <= 0:
        raise ValueError(f"output would be empty: X spatial {H}x{Wd} with pads {list(pads)} gives {OH}x{OW}")
    bt, _, at = _matrices(tile)
    a = tile + 2  # input window edge
    TH, TW = -(-OH // tile), -(-OW // tile)  # tiles per axis; the last may stick out

    # Zero-padded input, large enough for every window (tile TH + 2 >= OH + 2 = H + top + bottom).
    Xp = np.zeros((N, C, tile * TH + 2, tile * TW + 2), dtype=np.float64)
    Xp[:, :, top : top + H, left : left + Wd] = X
    # d[n, c, ty, tx] = the a x a window at (tile ty, tile tx): shape [N, C, TH, TW, a, a].
    d = np.lib.stride_tricks.sliding_window_view(Xp, (a, a), axis=(2, 3))[:, :, ::tile, ::tile]

    U = transform_weights(W, np.float64, tile)  # [a, a, M, C]
    V = np.einsum("ij,nctujk,lk->ilnctu", bt, d, bt, optimize=True)  # B^T d B: [a, a, N, C, TH, TW]
    Mt = np.einsum("xymc,xynctu->xynmtu", U, V, optimize=True)  # a*a GEMMs over c: [a, a, N, M, TH, TW]
    Yt = np.einsum("ix,xynmtu,jy->nmtiuj", at, Mt, at, optimize=True)  # A^T Mt A: [N, M, TH, t, TW, t]
    Y = Yt.reshape(N, M, tile * TH, tile * TW)[:, :, :OH, :OW]
    if B is not None:
        Y = Y + B.astype(np.float64)[None, :, None, None]
    return np.ascontiguousarray(Y, dtype=X.dtype)


class WinogradConv(OpRun):
    """WinogradConv for onnx.reference.ReferenceEvaluator(model, new_ops=[WinogradConv]).

    The class name is the op type the evaluator matches, with op_domain.
    """

    op_domain = "onnxopt"

    def _run(self, X, W, B=None, pads=None, tile=None):
        return (winograd_conv(X, W, B, (0, 0, 0, 0) if pads is None else pads, 2 if tile is None else tile),)


WinogradConvRef = WinogradConv  # the name other modules import

SPEC = OpSpec(
    name="WinogradConv",
    summary="3x3 stride-1 convolution by Winograd F(2x2, 3x3) or F(4x4, 3x3); equals ONNX Conv",
    inputs=[
        ("X", "float32 [N, C, H, W]; input"),
        ("W", "float32 [M, C, 3, 3]; filters, a constant initializer (transformed once at session creation)"),
        ("B", "float32 [M], optional; bias, a constant initializer"),
    ],
    outputs=[("Y", "float32 [N, M, H + top + bottom - 2, W + left + right - 2]")],
    attributes=[
        ("pads", "ints [top, left, bottom, right] (ONNX Conv order), non-negative; default [0, 0, 0, 0]"),
        ("tile", "int, 2 or 4: output tile edge, F(2x2, 3x3) or F(4x4, 3x3); default 2"),
        ("strides, dilations", "ints, optional; only all-ones is accepted"),
        ("group", "int, optional; only 1 is accepted"),
        ("kernel_shape", "ints, optional; only [3, 3] is accepted"),
    ],
    constraints=[
        "stride 1, dilation 1, group 1, kernel 3x3 only",
        "X's channel count equals W's C; B has M elements",
        "W and B are constant initializers (error at session creation otherwise)",
        "the output is non-empty: H + top + bottom > 2 and W + left + right > 2",
    ],
    formula="""
B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
G   = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
A^T = [1 1 1 0; 0 1 -1 -1]
U[:, :, m, c] = G W[m, c] G^T                                  (4x4, once)
V[:, :, c, t] = B^T d[c, t] B     d = 4x4 window of zero-padded X at (2 ty, 2 tx)
M[xi, nu, m, t] = sum_c U[xi, nu, m, c] V[xi, nu, c, t]        (16 GEMMs)
Y[n, m, 2 ty : 2 ty + 2, 2 tx : 2 tx + 2] = A^T M[:, :, m, t] A + B[m]   (cropped at the edges)
tile = 4: 6x6 windows at stride 4, 36 GEMMs, with
B4^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
G4   = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1]
A4^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
""",
    reference=winograd_conv,
)

__all__ = [
    "AT",
    "AT4",
    "BT",
    "BT4",
    "G4",
    "MATRICES",
    "SPEC",
    "G",
    "WinogradConv",
    "WinogradConvRef",
    "transform_weights",
    "winograd_conv",
]
