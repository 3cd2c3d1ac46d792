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
  int strip = 2;       // spectrum columns per column strip: th * strip V8 of a plane stay in L1
  // Stage-concatenated twiddles e^{-2 pi i j / (2 half)}, j < half, for half = 1, 2, ..., n/2: the stage with
  // butterfly span `half` reads entries [half - 1, 2 half - 1).
  std::vector<float> col_re, col_im;  // n = th
  std::vector<float> row_re, row_im;  // n = h
  std::vector<int> row_bitrev;        // bit reversal of h indices
  std::vector<float> real_re, real_im;  // e^{-2 pi i k / tw}, k = 0..h
};

// The state of stream_rows: one contiguous destination per lane (output channel).
struct RowStream {
  float* dst[kLanes] = {};    // start of the region each lane writes
  int64_t pos[kLanes] = {};   // offset in dst[l] of stage lane l's first float
  int pend[kLanes] = {};      // floats waiting in the stage (< 8 after each call)
  float bias[kLanes] = {};
  int lanes = kLanes;         // lanes in use
  float* stage = nullptr;     // kLanes * stage_ld floats, stage_ld >= cols + 8
  int64_t stage_ld = 0;
};

// The vector code, compiled twice (fft_portable.cc and fft_avx2.cc, the latter for AVX2+FMA).
struct Kernels {
  // tile [th][tw] V8 -> spectrum re/im [th][nbw] V8 (rows bit-reversed). `tile` is left intact.
  void (*forward)(const Plan& p, const float* tile, float* re, float* im);
  // The inverse in two halves, so that a caller can run the row half a few rows at a time over several tiles:
  // product_cols: per column strip (Plan::strip columns, all rows), the complex products summed over the
  //   channels for nt tiles, then each tile's column transforms of that strip while it is in L1:
  //     y_t[f] = sum_{c < C} w[f][c] * x_t,c[f]   (complex; lanes of w and y = 8 output channels)
  //   w: one output-channel group's filter spectra, bins in strip order (strip by strip, within a strip row
  //   by row) x [C][re V8, im V8]; x_t,c[f]: re at x[xt[t] + (c / 8) * xg + c % 8 + f * xf], im xi floats
  //   after it (f in natural order); y_t = y + t * y_stride: re [th][nbw] V8 then im [th][nbw] V8 (rows bit-reversed), left
  //   column-transformed for inverse_rows.
  // inverse_rows: spectrum rows [row0, row0 + rows) after product_cols (destroyed) -> those rows of
  //   th * tw * x, columns [0, cols), into out[a * ldo + c] V8, a < rows, c < cols <= tw.
  void (*inverse_rows)(const Plan& p, float* re, float* im, int row0, int rows, float* out, int64_t ldo, int cols);
  void (*product_cols)(const Plan& p, const float* w, const float* x, const int64_t* xt, int nt,
                       int64_t channels, int64_t xg, int64_t xf, int64_t xi, float* y, int64_t y_stride);
  // out [rows][tw] V8 -> dst[l][a * row_step + c] = out[a][c][l] + bias[l], a < rows, c < cols, l < lanes:
  // the crop of a tile into lanes (<= 8) output planes whose columns are contiguous.
  void (*scatter)(const float* out, int rows, int cols, int tw, float* const* dst, int64_t row_step,
                  const float* bias, int lanes);
  // Whole output rows, written as one contiguous stream per plane: src [rows][ld] V8 (columns [0, cols) used)
  // -> lane l's plane continues at s.dst[l] + s.pos[l] with src[a][c][l] + s.bias[l], row after row. The AVX2
  // build writes 32-byte-aligned chunks with non-temporal stores (no read-for-ownership of the output's lines);
  // up to 7 floats per lane wait in s.stage for the next row. stream_end writes what waits and fences.
  void (*stream_rows)(const float* src, int rows, int cols, int64_t ld, RowStream& s);
  void (*stream_end)(RowStream& s);
};

const Kernels& PortableKernels();
const Kernels& Avx2Kernels();

}  // namespace fft
}  // namespace onnxopt
