// Real 2-D FFTs of power-of-two sizes, computed on eight independent transforms at once (one per lane of an
// 8-float vector), for the FFTConv kernel. Written here: radix-2 butterflies, twiddles computed in double.
//
// Layouts (floats; "V8" = 8 consecutive floats, one per lane):
//   tile      [th][tw] V8                 real samples, row-major
//   spectrum  re [th][nbw] V8, im [th][nbw] V8   with nbw = tw/2 + 1 (the non-redundant half of each row)
// The forward transform is the DFT with e^{-2 pi i (u a / th + v b / tw)}; rows of the spectrum (the th axis)
// are left in BIT-REVERSED order, which the inverse expects: the convolution only multiplies spectra
// elementwise, so the order never matters and the bit-reversal permutation of the column FFTs is skipped.
// The inverse is unnormalised (it returns th * tw * x); FFTConv folds 1 / (th * tw) into the filter spectra.
//
// Row transforms use the half-length complex FFT of a real sequence: z[k] = x[2k] + i x[2k+1],
//   Z = FFT_h(z), X[k] = E[k] + w^k O[k], X[h-k] = conj(E[k] - w^k O[k]),
//   E[k] = (Z[k] + conj Z[h-k]) / 2, O[k] = -i (Z[k] - conj Z[h-k]) / 2, w = e^{-2 pi i / tw}, h = tw / 2.
// Column transforms are decimation-in-frequency (forward, natural in, bit-reversed out) and
// decimation-in-time (inverse, bit-reversed in, natural out) FFTs whose elements are whole spectrum rows.
#pragma once

#include <cstdint>
#include <vector>

namespace onnxopt {
namespace fft {

constexpr int kLanes = 8;

// Twiddles and permutations for one tile size; built once per size (in double, rounded once to float).
struct Plan {
  Plan(int th, int tw);
  int th = 1, tw = 2;  // tile rows (1 or a power of two), tile columns (a power of two >= 2)
  int h = 1;           // tw / 2: length of the complex FFT of each row
  int nbw = 2;         // h + 1 spectrum columns
  int bins = 2;        // th * nbw
  // Stage-concatenated twiddles e^{-2 pi i j / (2 half)}, j < half, for half = 1, 2, ..., n/2: the stage with
  // butterfly span `half` reads entries [half - 1, 2 half - 1).
  std::vector<float> col_re, col_im;  // n = th
  std::vector<float> row_re, row_im;  // n = h
  std::vector<int> row_bitrev;        // bit reversal of h indices
  std::vector<float> real_re, real_im;  // e^{-2 pi i k / tw}, k = 0..h
};

// The vector code, compiled twice (fft_portable.cc and fft_avx2.cc, the latter for AVX2+FMA).
struct Kernels {
  // tile [th][tw] V8 -> spectrum re/im [th][nbw] V8 (rows bit-reversed). `tile` is left intact.
  void (*forward)(const Plan& p, const float* tile, float* re, float* im);
  // spectrum re/im [th][nbw] V8 (rows bit-reversed; destroyed) -> rows [0, rows) of th * tw * x into
  // out [rows][tw] V8.
  void (*inverse)(const Plan& p, float* re, float* im, float* out, int rows);
  // Complex products summed over channels, for nt <= 4 tiles:
  //   y_t[f] = sum_{c < C} w[f][c] * x_t[f][c]   (complex; lanes of w and y = 8 output channels)
  // w: [bins][C][re V8, im V8]; x_t = x + t * x_stride: [bins][cgroups][re 8, im 8] (lanes = channels);
  // y_t = y + t * y_stride: re [bins] V8 followed by im [bins] V8.
  void (*product)(const float* w, const float* x, int64_t x_stride, int nt, int bins, int64_t channels,
                  int64_t cgroups, float* y, int64_t y_stride);
  // out [rows][tw] V8 -> dst[l][a * row_step + c] = out[a][c][l] + bias[l], a < rows, c < cols, l < lanes:
  // the crop of a tile into lanes (<= 8) output planes whose columns are contiguous.
  void (*scatter)(const float* out, int rows, int cols, int tw, float* const* dst, int64_t row_step,
                  const float* bias, int lanes);
};

const Kernels& PortableKernels();
const Kernels& Avx2Kernels();

}  // namespace fft
}  // namespace onnxopt
