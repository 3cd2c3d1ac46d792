// AVX2 + FMA builds of the batched LowBitMatMul loops (lowbit_gemm.h); compiled with -mavx2 -mfma, chosen at
// kernel creation where the CPU has both and no AVX-512 VNNI (BestBatchKernels).
//
// act_bits = 8: 4 rows x 2 columns per micro-kernel. A chunk's 16 code bytes of a column are broadcast to both
// 128-bit lanes and the upper lane shifted right by 4 (the mask then keeps each byte's own nibble): codes
// 0..31 in order against 32 int8 inputs of a row, one load. vpmaddubsw multiplies them into 16-bit pair sums
// (at most 2 * 15 * 127 = 3810, so 8 chunks add in 16 bits without overflow); per group (or 8 chunks)
// vpmaddwd widens to 32 bits and the group's scale multiplies the float conversion. The unpacked codes of a
// chunk serve 4 rows; the zero-point term, sum_g scale_zero sumxq, is one dot product (ZeroTerm) per row and
// column at the end.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <cfloat>

#include "lowbit_gemm.h"

#define LOWBIT_GEMM_IMPL avx2
constexpr int kMaxVecs = 3;  // 3 row vectors x 4 columns = 12 accumulators of 16 registers
#include "lowbit_gemm_f32.h"

namespace onnxopt {
namespace lowbit {
namespace {

// Bytes ahead in the packed codes (one stream: a block's chunks, then the next block's) that the micro-kernels
// prefetch, so that few rows (compute short of the memory time) overlap the two.
constexpr int64_t kPrefetch = 4096;

inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sum_g scale_zero[col, g] sumxq[g]: the column's scale_zero sits in blocks of four columns (ScaleIndex).
inline float ZeroTerm(const Weights& w, int64_t col, const float* sumxq) {
  const float* sz = w.scale_zero.data() + w.ScaleIndex(col, 0);
  float t = 0.0f;
  for (int64_t g = 0; g < w.groups; ++g) t += sz[g * kBlock] * sumxq[g];
  return t;
}

// Rows r0 .. r0 + kR - 1, columns n + c0 and n + c0 + 1 (c0 = 0 or 2 of the block at n), all groups; writes
// only columns < n1.
template <int kR>
void I8Micro(const Weights& w, const RowsI8& x, const float* b, int64_t r0, int64_t n, int64_t c0, int64_t n1,
             float* y, int64_t ldy) {
  const int64_t per_group = w.group / kChunk, slab_groups = w.slab_chunks / per_group;
  const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4), mask = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xr[kR];
  for (int r = 0; r < kR; ++r) xr[r] = x.xq + (r0 + r) * w.kp;
  __m256 acc[kR][2];
  for (int r = 0; r < kR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t gs = 0; gs < w.groups; gs += slab_groups) {
    const int64_t ge = std::min(w.groups, gs + slab_groups);
    const uint8_t* p = w.Chunk(n, gs * per_group) + c0 * 16;
    for (int64_t g = gs; g < ge; ++g) {
      for (int64_t j0 = 0; j0 < per_group; j0 += 8) {
        __m256i s16[kR][2];
        for (int r = 0; r < kR; ++r) s16[r][0] = s16[r][1] = _mm256_setzero_si256();
        const int64_t j1 = std::min(per_group, j0 + 8);
        for (int64_t j = j0; j < j1; ++j, p += kBlock * 16) {
          _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
          __m256i q[2];
          for (int c = 0; c < 2; ++c) {
            const __m256i v =
                _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c * 16)));
            q[c] = _mm256_and_si256(_mm256_srlv_epi32(v, shift), mask);
          }
          const int64_t off = (g * per_group + j) * kChunk;
          for (int r = 0; r < kR; ++r) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[r] + off));
            for (int c = 0; c < 2; ++c) s16[r][c] = _mm256_add_epi16(s16[r][c], _mm256_maddubs_epi16(q[c], xv));
          }
        }
        for (int c = 0; c < 2; ++c) {
          const __m256 s = _mm256_broadcast_ss(&w.scale[w.ScaleIndex(n + c0 + c, g)]);
          for (int r = 0; r < kR; ++r) {
            acc[r][c] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[r][c], ones)), acc[r][c]);
          }
        }
      }
    }
  }
  for (int c = 0; c < 2 && n + c0 + c < n1; ++c) {
    const int64_t col = n + c0 + c;
    const float bias = b ? b[col] : 0.0f;
    for (int r = 0; r < kR; ++r) {
      const float zt = ZeroTerm(w, col, x.sumxq + (r0 + r) * w.groups);
      y[(r0 + r) * ldy + col] = x.xscale[r0 + r] * (HSum(acc[r][c]) - zt) + bias;
    }
  }
}

// Per column pair, every block of 4 rows: the pair's codes (kp bytes) stay in L1 while the rows stream past.
// Passes of up to 64 rows (their inputs, 64 kp bytes, stay in L2 over the task's columns).
void GemmI8(const Weights& w, const RowsI8& x, const float* b, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  for (int64_t r0 = 0; r0 < x.rows; r0 += 64) {
    const int64_t r1 = std::min(x.rows, r0 + 64);
    for (int64_t n = n0; n < n1; n += kBlock) {
      for (int64_t c0 = 0; c0 < kBlock && n + c0 < n1; c0 += 2) {
        int64_t r = r0;
        for (; r + 4 <= r1; r += 4) I8Micro<4>(w, x, b, r, n, c0, n1, y, ldy);
        switch (r1 - r) {
          case 3: I8Micro<3>(w, x, b, r, n, c0, n1, y, ldy); break;
          case 2: I8Micro<2>(w, x, b, r, n, c0, n1, y, ldy); break;
          case 1: I8Micro<1>(w, x, b, r, n, c0, n1, y, ldy); break;
          default: break;
        }
      }
    }
  }
}

constexpr int64_t kSmallRows = 12;  // fewer rows (bits 4): SmallRows; more: the tile GEMM of lowbit_gemm_f32.h

// Rows r0 .. r0 + kR - 1 of x [rows][kp], columns n + c0, n + c0 + 1 of the block at n (bits 4), all groups: per
// chunk and column, the 32 codes decoded into 4 vectors of dequantized weights, each FMAed against the same 8
// inputs of every row (the tile GEMM, one weight broadcast per FMA, is load-bound with one row vector).
template <int kR>
void SmallMicro(const Weights& w, const float* x, const float* b, int64_t r0, int64_t n, int64_t c0, int64_t n1,
                float* y, int64_t ldy) {
  const int64_t per_group = w.group / kChunk, slab_groups = w.slab_chunks / per_group;
  const float* xr[kR];
  __m256 acc[kR][2];
#pragma GCC unroll 4
  for (int r = 0; r < kR; ++r) {
    xr[r] = x + (r0 + r) * w.kp;
    acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  }
  for (int64_t gs = 0; gs < w.groups; gs += slab_groups) {
    const int64_t ge = std::min(w.groups, gs + slab_groups);
    const uint8_t* p = w.Chunk(n, gs * per_group) + c0 * 16;
    for (int64_t g = gs; g < ge; ++g) {
      for (int64_t j = 0; j < per_group; ++j, p += kBlock * 16) {
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
        const int64_t off = (g * per_group + j) * kChunk;
#pragma GCC unroll 2
        for (int c = 0; c < 2; ++c) {
          const int64_t at = w.ScaleIndex(n + c0 + c, g);
          const __m256 s = _mm256_broadcast_ss(&w.scale[at]), z = _mm256_broadcast_ss(&w.scale_zero[at]);
          __m256i q[4];
          DecodeChunk<4>(p + c * 16, q);
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) {
            const __m256 wv = _mm256_fmsub_ps(s, _mm256_cvtepi32_ps(q[i]), z);
#pragma GCC unroll 4
            for (int r = 0; r < kR; ++r) acc[r][c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr[r] + off + 8 * i), acc[r][c]);
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

void GemmF32(const Weights& w, const float* x, const float* xt, int64_t rows, const float* b, int64_t n0, int64_t n1,
             float* y, int64_t ldy) {
  if (xt != nullptr) return avx2::GemmF32(w, xt, rows, b, n0, n1, y, ldy);
  for (int64_t n = n0; n < n1; n += kBlock) {  // few rows, bits 4 (RunBatch)
    for (int64_t c0 = 0; c0 < kBlock && n + c0 < n1; c0 += 2) {
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) SmallMicro<4>(w, x, b, r, n, c0, n1, y, ldy);
      switch (rows - r) {
        case 3: SmallMicro<3>(w, x, b, r, n, c0, n1, y, ldy); break;
        case 2: SmallMicro<2>(w, x, b, r, n, c0, n1, y, ldy); break;
        case 1: SmallMicro<1>(w, x, b, r, n, c0, n1, y, ldy); break;
        default: break;
      }
    }
  }
}

}  // namespace

const BatchKernels& Avx2BatchKernels() {
  static const BatchKernels k{GemmI8, GemmF32, Avx2Kernels().quantize, avx2::kLanes, false, kSmallRows};
  return k;
}

}  // namespace lowbit
}  // namespace onnxopt

#endif  // x86
