// AVX-512 builds of the batched LowBitMatMul loops (lowbit_gemm.h), chosen at kernel creation where the CPU and
// OS run AVX-512 F/BW/VL/VNNI (kernel_util's HasAvx512) and ONNXOPT_DISABLE_AVX512 is not set; the AVX2 and portable
// paths stay (tests run all three). Compiled for these instructions by the pragma below, not by the build's
// flags: only this file uses them.
//
// act_bits = 8: up to 8 rows x one block of 4 columns per micro-kernel. The block's chunk (4 columns x 16
// bytes, as packed) is one 512-bit load; an and and a shift split it into the codes k 0..15 (low nibbles) and
// 16..31 (high nibbles) of each column, one column per 128-bit lane. A row's 16 int8 inputs of each half are
// broadcast to the four lanes, and vpdpbusd (u8 codes x s8 inputs, four products per int32 lane) accumulates:
// 2 instructions per row for 4 x 32 weights. Per group the int32 lanes are converted and scaled with a vector
// holding each column's scale in its 4 lanes, and the zero-point term enters as scale_zero (in lane 0 of each
// column) times the row's group sum. Four lanes per column are summed once at the end.
//
// act_bits = 0: lowbit_gemm_f32.h with 32 vector registers (up to 6 row vectors x 4 columns).
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "lowbit_gemm.h"

#define LOWBIT_GEMM_IMPL avx512
constexpr int kMaxVecs = 6;  // 6 row vectors x 4 columns = 24 accumulators of 32 registers
#include "lowbit_gemm_f32.h"

namespace onnxopt {
namespace lowbit {
namespace {

constexpr int kI8Quads = 2;  // row quads per act_bits = 8 micro-kernel (8 rows)
// Bytes ahead in the packed codes (one stream: a block's chunks, then the next block's) that the micro-kernels
// prefetch, so that few rows (compute short of the memory time) overlap the two.
constexpr int64_t kPrefetch = 4096;

// kQ quads of rows (4 kQ rows, from quad q0) x the block of 4 columns at n, over all groups. Writes only rows
// < x.rows and columns < n1.
template <int kQ>
void I8Micro(const Weights& w, const RowsI8& x, const float* b, int64_t q0, int64_t n, int64_t n1, float* y,
             int64_t ldy) {
  const int64_t per_group = w.group / kChunk, slab_groups = w.slab_chunks / per_group;
  const __m512i mask = _mm512_set1_epi8(15);
  const int8_t* xq[kQ];
  const float* sums[kQ];
  // The float sums live in L1, touched once per group: the registers hold the int32 dot products (4 kQ), the
  // quads' inputs (2 kQ) and one column's codes.
  alignas(64) float acc[kBlock][kQ][16] = {};
#pragma GCC unroll 4
  for (int q = 0; q < kQ; ++q) {
    xq[q] = x.xq4 + (q0 + q) * w.kp * 4;
    sums[q] = x.sums4 + (q0 + q) * w.groups * 16;
  }
  for (int64_t gs = 0; gs < w.groups; gs += slab_groups) {
    const int64_t ge = std::min(w.groups, gs + slab_groups);
    const uint8_t* p = w.Chunk(n, gs * per_group);
    for (int64_t g = gs; g < ge; ++g) {
      __m512i dot[kBlock][kQ];
#pragma GCC unroll 4
      for (int c = 0; c < kBlock; ++c) {
#pragma GCC unroll 4
        for (int q = 0; q < kQ; ++q) dot[c][q] = _mm512_setzero_si512();
      }
      for (int64_t j = 0; j < per_group; ++j, p += kBlock * 16) {
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
        const int64_t off = (g * per_group + j) * 128;
        __m512i xlo[kQ], xhi[kQ];
#pragma GCC unroll 4
        for (int q = 0; q < kQ; ++q) {
          xlo[q] = _mm512_loadu_si512(xq[q] + off);
          xhi[q] = _mm512_loadu_si512(xq[q] + off + 64);
        }
#pragma GCC unroll 4
        for (int c = 0; c < kBlock; ++c) {
          const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c * 16)));
          const __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
#pragma GCC unroll 4
          for (int q = 0; q < kQ; ++q) {
            dot[c][q] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot[c][q], lo, xlo[q]), hi, xhi[q]);
          }
        }
      }
#pragma GCC unroll 4
      for (int c = 0; c < kBlock; ++c) {
        const int64_t i = w.ScaleIndex(n + c, g);
        const __m512 s = _mm512_set1_ps(w.scale[i]), sz = _mm512_set1_ps(w.scale_zero[i]);
#pragma GCC unroll 4
        for (int q = 0; q < kQ; ++q) {
          const __m512 a = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(dot[c][q]), _mm512_load_ps(acc[c][q]));
          _mm512_store_ps(acc[c][q], _mm512_fnmadd_ps(sz, _mm512_loadu_ps(sums[q] + g * 16), a));
        }
      }
    }
  }
  for (int c = 0; c < kBlock; ++c) {
    if (n + c >= n1) break;
    const float bias = b ? b[n + c] : 0.0f;
    for (int q = 0; q < kQ; ++q) {
      const float* lanes = acc[c][q];
      for (int i = 0; i < 4; ++i) {
        const int64_t r = (q0 + q) * 4 + i;
        if (r >= x.rows) break;
        const float v = (lanes[4 * i] + lanes[4 * i + 1]) + (lanes[4 * i + 2] + lanes[4 * i + 3]);
        y[r * ldy + n + c] = x.xscale[r] * v + bias;
      }
    }
  }
}

// Per block of 4 columns, every pair of row quads of a pass of 64 rows: the block's codes (2 kp bytes) stay in
// L1 while the rows stream past.
void GemmI8(const Weights& w, const RowsI8& x, const float* b, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t quads = (x.rows + 3) / 4;
  for (int64_t p0 = 0; p0 < quads; p0 += 16) {  // passes of 64 rows: their inputs stay in L2
    const int64_t p1 = std::min(quads, p0 + 16);
    for (int64_t n = n0; n < n1; n += kBlock) {
      int64_t q = p0;
      for (; q + kI8Quads <= p1; q += kI8Quads) I8Micro<kI8Quads>(w, x, b, q, n, n1, y, ldy);
      if (q < p1) I8Micro<1>(w, x, b, q, n, n1, y, ldy);
    }
  }
}

constexpr int64_t kSmallRows = 16;  // fewer rows (bits 4): SmallRows; more: the tile GEMM of lowbit_gemm_f32.h

inline float HSum(__m512 v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rows r0 .. r0 + kR - 1 of x [rows][kp], columns n + c0, n + c0 + 1 of the block at n (bits 4), all groups:
// per chunk and column, the codes k 0..15 and 16..31 widened to two vectors of dequantized weights, each FMAed
// against the same 16 inputs of every row. Writes only columns < n1.
template <int kR>
void SmallMicro(const Weights& w, const float* x, const float* b, int64_t r0, int64_t n, int64_t c0, int64_t n1,
                float* y, int64_t ldy) {
  const int64_t per_group = w.group / kChunk, slab_groups = w.slab_chunks / per_group;
  const __m128i mask = _mm_set1_epi8(15);
  const float* xr[kR];
  __m512 acc[kR][2];
#pragma GCC unroll 8
  for (int r = 0; r < kR; ++r) {
    xr[r] = x + (r0 + r) * w.kp;
    acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  }
  for (int64_t gs = 0; gs < w.groups; gs += slab_groups) {
    const int64_t ge = std::min(w.groups, gs + slab_groups);
    const uint8_t* p = w.Chunk(n, gs * per_group) + c0 * 16;
    for (int64_t g = gs; g < ge; ++g) {
      __m512 s[2], z[2];
#pragma GCC unroll 2
      for (int c = 0; c < 2; ++c) {
        s[c] = _mm512_set1_ps(w.scale[w.ScaleIndex(n + c0 + c, g)]);
        z[c] = _mm512_set1_ps(w.scale_zero[w.ScaleIndex(n + c0 + c, g)]);
      }
      for (int64_t j = 0; j < per_group; ++j, p += kBlock * 16) {
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
        const int64_t off = (g * per_group + j) * kChunk;
#pragma GCC unroll 2
        for (int c = 0; c < 2; ++c) {
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c * 16));
          const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
          const __m512 w0 = _mm512_fmsub_ps(s[c], _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), z[c]);
          const __m512 w1 = _mm512_fmsub_ps(s[c], _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), z[c]);
#pragma GCC unroll 8
          for (int r = 0; r < kR; ++r) {
            acc[r][c] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr[r] + off), acc[r][c]);
            acc[r][c] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr[r] + off + 16), acc[r][c]);
          }
        }
      }
    }
  }
  for (int c = 0; c < 2; ++c) {
    if (n + c0 + c >= n1) break;
    const float bias = b ? b[n + c0 + c] : 0.0f;
    for (int r = 0; r < kR; ++r) y[(r0 + r) * ldy + n + c0 + c] = HSum(acc[r][c]) + bias;
  }
}

// Few rows: per column pair, every block of up to 8 rows (the pair's codes stay in L1).
void SmallRows(const Weights& w, const float* x, int64_t rows, const float* b, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  for (int64_t n = n0; n < n1; n += kBlock) {
    for (int64_t c0 = 0; c0 < kBlock && n + c0 < n1; c0 += 2) {
      int64_t r = 0;
      for (; r + 8 <= rows; r += 8) SmallMicro<8>(w, x, b, r, n, c0, n1, y, ldy);
      switch (rows - r) {
        case 7: SmallMicro<7>(w, x, b, r, n, c0, n1, y, ldy); break;
        case 6: SmallMicro<6>(w, x, b, r, n, c0, n1, y, ldy); break;
        case 5: SmallMicro<5>(w, x, b, r, n, c0, n1, y, ldy); break;
        case 4: SmallMicro<4>(w, x, b, r, n, c0, n1, y, ldy); break;
        case 3: SmallMicro<3>(w, x, b, r, n, c0, n1, y, ldy); break;
        case 2: SmallMicro<2>(w, x, b, r, n, c0, n1, y, ldy); break;
        case 1: SmallMicro<1>(w, x, b, r, n, c0, n1, y, ldy); break;
        default: break;
      }
    }
  }
}

void GemmF32(const Weights& w, const float* x, const float* xt, int64_t rows, const float* b, int64_t n0, int64_t n1,
             float* y, int64_t ldy) {
  if (xt == nullptr) return SmallRows(w, x, rows, b, n0, n1, y, ldy);  // bits 4 (RunBatch)
  avx512::GemmF32(w, xt, rows, b, n0, n1, y, ldy);
}

}  // namespace

const BatchKernels& Avx512BatchKernels() {
  static const BatchKernels k{GemmI8, GemmF32, Avx2BatchKernels().quantize, avx512::kLanes, true, kSmallRows};
  return k;
}


}  // namespace lowbit
}  // namespace onnxopt

#endif  // x86
