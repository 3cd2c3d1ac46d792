// LowBitMatMul for more than one input row (rows = the product of X's leading dimensions): GEMMs that read the
// packed codes (lowbit.h) once per block of rows instead of once per row.
//
// act_bits = 8 (bits 4): each row r is quantized to int8 xq[r] with scale s[r] (Kernels::quantize), and
//   y[r, n] = s[r] sum_g (scale[n, g] dot_g(q[., n], xq[r]) - scale_zero[n, g] sumxq[r, g]) + b[n],
// dot_g the exact int32 dot product over group g. The micro-kernels unpack a chunk of codes (32 k) once and
// multiply it against 8 rows (AVX-512 VNNI: 4 columns, vpdpbusd of the u8 codes, broadcast per column, with
// the s8 inputs of two quads of rows, pre-arranged so that each is one load; AVX2: 2 columns x 4 rows,
// vpmaddubsw into 16-bit pair sums, widened by vpmaddwd per group). Passes of 64 rows.
//
// act_bits = 0, few rows (bits 4; rows < 16 with AVX-512, < 12 with AVX2): k in the lanes instead, as at batch
// 1: per chunk and column, 32 codes decoded into vectors of dequantized weights, FMAed against the same k of up
// to 8 (AVX-512) or 4 (AVX2) rows. With one or two row vectors the tile GEMM below is bound by its loads (a
// weight broadcast per FMA or two).
//
// act_bits = 0: y = x W + b with W dequantized (W[k, n] = scale q - scale_zero, as lowbit.h) into a tile of
// 32 columns x 128 k, column-major, and the rows of x transposed into vectors of `lanes` rows, xt[v][k][lanes]
// (rows padded with zeros). The micro-kernel keeps up to 3 (AVX2) or 6 (AVX-512VL: 32 registers) row vectors x
// 4 columns of y in registers and, per k, loads the row vectors and broadcasts 4 weights of the tile: a
// broadcast-FMA GEMM with no horizontal sums, whose dequantizing costs one pass over the codes per 256 rows.
//
// Both are threaded over tasks of 32 columns with the kernel context's ParallelFor.
#pragma once

#include <cstdint>
#include <string>

#include "lowbit.h"

struct OrtKernelContext;

namespace onnxopt {
namespace lowbit {

constexpr int64_t kGemmCols = 32;  // columns per batched task
constexpr int64_t kGemmK = 128;    // k per dequantized tile of the float path (a multiple of kChunk)

// act_bits = 8 inputs, prepared once per call: xq [rows][kp] (zero-padded), sumxq [rows][groups] (integer
// valued), xscale [rows].
struct RowsI8 {
  const int8_t* xq = nullptr;
  const float* sumxq = nullptr;
  const float* xscale = nullptr;
  int64_t rows = 0;
  // Where the kernels ask for it (BatchKernels::quads): the rows in quads of 4 (the last padded with zero rows),
  // xq4 [quads][kp / 32][2][4][16]: per chunk, the 16 inputs k 0..15 of the quad's 4 rows, then k 16..31; and
  // sums4 [quads][groups][16]: row i of the quad's group sum in lane 4 i, zeros elsewhere.
  const int8_t* xq4 = nullptr;
  const float* sums4 = nullptr;
};

// Columns [n0, n1) of every row (n0 a multiple of kBlock): y[r * ldy + n] = the act_bits = 8 formula above,
// bias b (null: none) included.
using GemmI8Fn = void (*)(const Weights& w, const RowsI8& x, const float* b, int64_t n0, int64_t n1, float* y,
                          int64_t ldy);
// Columns [n0, n1) (n0 a multiple of kBlock) of y = x W + b for `rows` rows, x [rows][kp], also given as
// xt [v][kp][lanes] unless bits = 4 and rows < BatchKernels::small_rows (then null).
using GemmF32Fn = void (*)(const Weights& w, const float* x, const float* xt, int64_t rows, const float* b,
                           int64_t n0, int64_t n1, float* y, int64_t ldy);

struct BatchKernels {
  GemmI8Fn gemm_i8;    // bits 4 only
  GemmF32Fn gemm_f32;  // any bits
  QuantizeFn quantize;  // lowbit.h's row quantizer of the same build
  int64_t lanes;  // rows per vector of xt
  bool quads;     // gemm_i8 reads RowsI8::xq4 and sums4
  int64_t small_rows;  // bits 4: gemm_f32 needs xt only from this many rows
};

const BatchKernels& Avx2BatchKernels();
const BatchKernels& Avx512BatchKernels();
// The batched kernels for this CPU, chosen when a kernel is created: AVX-512 VNNI, else AVX2 + FMA, else null
// (the portable build then runs the per-row and tile loops of lowbit.cc).
const BatchKernels* BestBatchKernels();

// y [rows][n] = LowBitMatMul of x [rows][kp] (zero-padded to kp) with `kern`, act_bits 0 or 8, bias b (null:
// none). Fails with a message prefixed by `where` (bad input, out of memory).
void RunBatch(OrtKernelContext* context, const BatchKernels& kern, const Weights& w, const float* x, int64_t rows,
              int64_t act_bits, const float* b, float* y, const std::string& where);

}  // namespace lowbit
}  // namespace onnxopt
