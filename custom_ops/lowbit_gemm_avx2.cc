// AVX2 + FMA builds of the batched LowBitMatMul loops (lowbit_gemm.h); compiled with -mavx2 -mfma, chosen at
// kernel creation where the CPU has both and no AVX-512 VNNI (BestBatchKernels).
//
// act_bits = 8: 4 rows x 2 columns per micro-kernel. A chunk's 16 code bytes of a column are broadcast to both
// 128-bit lanes and the upper lane shifted right by 4 (the mask then keeps each byte's own nibble): codes
// 0..31 in order against 32 int8 inputs of a row, one load. vpmaddubsw multiplies them into 16-bit pair sums
// (at most 2 * 15 * 127 = 3810, so 8 chunks add in 16 bits without overflow); per group (or 8 chunks)
// vpmaddwd widens to 32 bits and the group's scale multiplies the float conversion. The unpacked codes of a
// chunk serve 4 rows; the zero-point term, sum_g scale_zero sumxq, is one contiguous dot product per row and
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

// sum_{g < groups} a[g] b[g].
inline float Dot(const float* a, const float* b, int64_t groups) {
  __m256 s = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + g), _mm256_loadu_ps(b + g), s);
  float t = HSum(s);
  for (; g < groups; ++g) t += a[g] * b[g];
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
  const float* scale[2] = {w.scale.data() + (n + c0) * w.groups, w.scale.data() + (n + c0 + 1) * w.groups};
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
          const __m256 s = _mm256_broadcast_ss(scale[c] + g);
          for (int r = 0; r < kR; ++r) {
            acc[r][c] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[r][c], ones)), acc[r][c]);
          }
        }
      }
    }
  }
  for (int c = 0; c < 2 && n + c0 + c < n1; ++c) {
    const int64_t col = n + c0 + c;
    const float* sz = w.scale_zero.data() + col * w.groups;
    const float bias = b ? b[col] : 0.0f;
    for (int r = 0; r < kR; ++r) {
      const float zt = Dot(sz, x.sumxq + (r0 + r) * w.groups, w.groups);
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

inline int32_t HSumI32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

inline float HMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// QuantizeRow (lowbit.cc) with the same float32 operations, 8 at a time: max |x|, x * (127 / max) rounded to
// nearest even (vroundps, as nearbyint), clamped, narrowed to int8 in k order; sums per group from the int32
// codes. -1 for a row with a non-finite value.
float Quantize(const Weights& w, const float* x, int8_t* xq, float* sums) {
  const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(FLT_MAX);
  __m256 m = _mm256_setzero_ps(), finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int64_t k = 0; k < w.kp; k += 8) {
    const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k));
    finite = _mm256_and_ps(finite, _mm256_cmp_ps(a, big, _CMP_LE_OQ));
    m = _mm256_max_ps(m, a);
  }
  if (_mm256_movemask_ps(finite) != 0xff) return -1.0f;
  const float a = HMax(m);
  const __m256 inv = _mm256_set1_ps(a > 0.0f ? 127.0f / a : 0.0f);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256i gsum = _mm256_setzero_si256();
    for (int64_t k = g * w.group; k < (g + 1) * w.group; k += kChunk) {
      __m256i i[4];
      for (int j = 0; j < 4; ++j) {
        const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * j), inv),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        i[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
        gsum = _mm256_add_epi32(gsum, i[j]);
      }
      const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + k), _mm256_permutevar8x32_epi32(bytes, order));
    }
    sums[g] = static_cast<float>(HSumI32(gsum));
  }
  return a > 0.0f ? a / 127.0f : 1.0f;
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
      const float* sc = w.scale.data() + (n + c0) * w.groups + g;
      const float* sz = w.scale_zero.data() + (n + c0) * w.groups + g;
      for (int64_t j = 0; j < per_group; ++j, p += kBlock * 16) {
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
        const int64_t off = (g * per_group + j) * kChunk;
#pragma GCC unroll 2
        for (int c = 0; c < 2; ++c) {
          const __m256 s = _mm256_broadcast_ss(sc + c * w.groups), z = _mm256_broadcast_ss(sz + c * w.groups);
          __m256i q[4];
          avx2::DecodeChunk<4>(p + c * 16, q);
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
  static const BatchKernels k{GemmI8, GemmF32, Quantize, avx2::kLanes, false, kSmallRows};
  return k;
}

}  // namespace lowbit
}  // namespace onnxopt

#endif  // x86
