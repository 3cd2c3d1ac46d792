"""Numpy reference of FFTConv: ONNX Conv (group 1, dilation 1) computed with FFTs, tile by tile.

Convolution theorem. ONNX Conv is a cross-correlation, y[i] = sum_a x[i + a] w[a]. For length-T sequences
the circular correlation is IFFT(FFT(x) . conj(FFT(w))) (w zero-padded to T), and it equals the linear one
for the outputs i <= T - K that do not wrap around. Summed over channels, and because the FFT is linear,

    Y_m = IFFT( sum_c conj(FFT(w_{m,c})) . FFT(x_c) )

so a tile needs one FFT per input channel, one complex matrix product [M x C] x [C] per frequency bin, and
one inverse FFT per output channel. In 2-D the same holds with 2-D FFTs of th x tw tiles.

Tiling (overlap-save). Input tiles of th x tw start every (th - kh + 1, tw - kw + 1) samples and overlap by
(kh - 1, kw - 1); each yields (th - kh + 1) x (tw - kw + 1) valid outputs, the rest is discarded. Memory
and FFT sizes stay bounded whatever the input size; the tile size is chosen from a cost model.

Polyphase strides. With x_p the zero-padded input and strides (sh, sw),

    y[i, j] = sum_c sum_{a, b} x_p[c, sh i + a, sw j + b] W[c, a, b]
            = sum_{c, p, q} sum_{a', b'} x_{c,p,q}[i + a', j + b'] w_{c,p,q}[a', b']
    x_{c,p,q}[i, j] = x_p[c, sh i + p, sw j + q],  w_{c,p,q}[a', b'] = W[c, sh a' + p, sw b' + q]

a stride-1 correlation over C sh sw "phase" channels with a kernel of ceil(KH / sh) x ceil(KW / sw): a
stride-4 512-tap filter becomes four 128-tap ones, and the FFTs stay short.

The C++ kernel (custom_ops/fftconv.cc) follows this scheme in float32 with its own FFT; this module uses
numpy.fft in float64 and is the readable statement of what it computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx.reference.op_run import OpRun

from onnxopt.ops import OpSpec


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def default_tile(kernel: int, out: int) -> int:
    """FFT tile extent for one axis: 1 for a 1-tap kernel, else the power of two >= 2 * kernel, no larger
    than one tile covering the whole output."""
    if kernel == 1:
        return 1
    return max(2, min(_pow2(2 * kernel), _pow2(out + kernel - 1)))


def polyphase(
    Xp: np.ndarray, W: np.ndarray, strides: tuple[int, int], out: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(x_{c,p,q}, w_{c,p,q}) of the module docstring: stride-1 phase inputs [N, C sh sw, OH + kh' - 1,
    OW + kw' - 1] and phase filters [M, C sh sw, kh', kw'] (zero where a phase filter runs past W)."""
    sh, sw = strides
    N, C = Xp.shape[:2]
    M, _, KH, KW = W.shape
    kh, kw = -(-KH // sh), -(-KW // sw)
    rows, cols = out[0] + kh - 1, out[1] + kw - 1
    # Enough zero padding at the end for every phase to have rows x cols samples.
    big = np.zeros((N, C, sh * rows + sh, sw * cols + sw), dtype=Xp.dtype)
    h, w = min(Xp.shape[2], big.shape[2]), min(Xp.shape[3], big.shape[3])
    big[:, :, :h, :w] = Xp[:, :, :h, :w]
    Wbig = np.zeros((M, C, sh * kh, sw * kw), dtype=W.dtype)
    Wbig[:, :, :KH, :KW] = W
    xs, ws = [], []
    for c in range(C):
        for p in range(sh):
            for q in range(sw):
                xs.append(big[:, c, p::sh, q::sw][:, :rows, :cols])
                ws.append(Wbig[:, c, p::sh, q::sw])
    return np.stack(xs, axis=1), np.stack(ws, axis=1)


def _check(X, W, B, pads, strides) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if X.ndim != 4:
        raise ValueError(f"X must have rank 4 [N, C, H, W], got shape {list(X.shape)}")
    if W.ndim != 4 or min(W.shape) < 1:
        raise ValueError(f"W must have shape [M, C, KH, KW] with every dimension >= 1, got {list(W.shape)}")
    if X.shape[1] != W.shape[1]:
        raise ValueError(
            f"X has {X.shape[1]} channels (shape {list(X.shape)}) but W expects C = {W.shape[1]}"
        )
    if B is not None and B.shape != (W.shape[0],):
        raise ValueError(f"B must have shape [{W.shape[0]}], got {list(B.shape)}")
    pads = tuple(int(p) for p in pads)
    if len(pads) != 4 or min(pads) < 0:
        raise ValueError(f"pads must be 4 non-negative ints [top, left, bottom, right], got {list(pads)}")
    strides = tuple(int(s) for s in strides)
    if len(strides) != 2 or min(strides) < 1:
        raise ValueError(f"strides must be 2 positive ints [sh, sw], got {list(strides)}")
    return pads, strides


def fft_conv(
    X: np.ndarray,
    W: np.ndarray,
    B: np.ndarray | None = None,
    pads: Sequence[int] = (0, 0, 0, 0),
    strides: Sequence[int] = (1, 1),
    tile: tuple[int, int] | None = None,
) -> np.ndarray:
    """Y = Conv(X, W, B, pads, strides) (group 1, dilation 1) by polyphase split, overlap-save tiles and
    numpy.fft, in float64; returns X's dtype. `tile` forces the FFT tile (th, tw) (powers of two, at least
    the phase kernel), else default_tile per axis."""
    X, W = np.asarray(X), np.asarray(W)
    B = None if B is None else np.asarray(B)
    (top, left, bottom, right), (sh, sw) = _check(X, W, B, pads, strides)
    N, _, H, Wd = X.shape
    M, _, KH, KW = W.shape
    span_h, span_w = H + top + bottom - KH, Wd + left + right - KW
    if span_h < 0 or span_w < 0:
        raise ValueError(
            f"output would be empty: X spatial {H}x{Wd} with pads {list(pads)} is smaller than the "
            f"{KH}x{KW} kernel"
        )
    OH, OW = span_h // sh + 1, span_w // sw + 1
    Xp = np.pad(X.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    xph, wph = polyphase(Xp, W.astype(np.float64), (sh, sw), (OH, OW))  # stride 1 from here on
    kh, kw = wph.shape[2:]
    th, tw = tile or (default_tile(kh, OH), default_tile(kw, OW))
    if th < kh or tw < kw:
        raise ValueError(f"tile {th}x{tw} is smaller than the phase kernel {kh}x{kw}")
    oth, otw = th - kh + 1, tw - kw + 1  # valid outputs per tile
    spec_w = np.conj(np.fft.rfft2(wph, s=(th, tw)))  # [M, C', th, tw/2+1]: once per tile size
    Y = np.zeros((N, M, OH, OW))
    for ty in range(-(-OH // oth)):
        for tx in range(-(-OW // otw)):
            i0, j0 = ty * oth, tx * otw
            patch = np.zeros((N, xph.shape[1], th, tw))
            src = xph[:, :, i0 : i0 + th, j0 : j0 + tw]
            patch[:, :, : src.shape[2], : src.shape[3]] = src
            spec_x = np.fft.rfft2(patch)  # [N, C', th, tw/2+1]
            spec_y = np.einsum("mcuv,ncuv->nmuv", spec_w, spec_x)  # the channel sum, per frequency bin
            tile_y = np.fft.irfft2(spec_y, s=(th, tw))[:, :, :oth, :otw]
            h, w = min(oth, OH - i0), min(otw, OW - j0)
            Y[:, :, i0 : i0 + h, j0 : j0 + w] = tile_y[:, :, :h, :w]
    if B is not None:
        Y += B.astype(np.float64)[None, :, None, None]
    return np.ascontiguousarray(Y, dtype=X.dtype)


class FFTConv(OpRun):
    """FFTConv for onnx.reference.ReferenceEvaluator(model, new_ops=[FFTConv])."""

    op_domain = "onnxopt"

    def _run(self, X, W, B=None, pads=None, strides=None):
        return (
            fft_conv(X, W, B, (0, 0, 0, 0) if pads is None else pads, (1, 1) if strides is None else strides),
        )


FFTConvRef = FFTConv

SPEC = OpSpec(
    name="FFTConv",
    summary="Conv (group 1, dilation 1) by FFTs: overlap-save tiles, polyphase strides; equals ONNX Conv",
    inputs=[
        ("X", "float32 [N, C, H, W]; input"),
        (
            "W",
            "float32 [M, C, KH, KW]; filters, a constant initializer (spectra computed once per tile size)",
        ),
        ("B", "float32 [M], optional; bias, a constant initializer"),
    ],
    outputs=[("Y", "float32 [N, M, (H + top + bottom - KH) / sh + 1, (W + left + right - KW) / sw + 1]")],
    attributes=[
        ("pads", "ints [top, left, bottom, right] (ONNX Conv order), non-negative; default [0, 0, 0, 0]"),
        ("strides", "ints [sh, sw], positive; default [1, 1]"),
        ("dilations", "ints, optional; only all-ones is accepted"),
        ("group", "int, optional; only 1 is accepted"),
        ("kernel_shape", "ints, optional; must equal W's [KH, KW]"),
    ],
    constraints=[
        "dilation 1, group 1",
        "X's channel count equals W's C; B has M elements",
        "W and B are constant initializers (error at session creation otherwise)",
        "the output is non-empty: H + top + bottom >= KH and W + left + right >= KW",
    ],
    formula="""
x_{c,p,q}[i, j] = Xpad[c, sh i + p, sw j + q]      w_{c,p,q}[a, b] = W[c, sh a + p, sw b + q]   (polyphase)
per th x tw input tile (tiles step by th - kh' + 1, tw - kw' + 1; overlap-save):
  Y_m = IRFFT2( sum_{c,p,q} conj(RFFT2(w_{m,c,p,q})) . RFFT2(x_{c,p,q} tile) )   cropped to the valid part
Y[n, m] += B[m]
""",
    reference=fft_conv,
)

__all__ = ["SPEC", "FFTConv", "FFTConvRef", "default_tile", "fft_conv", "polyphase"]
