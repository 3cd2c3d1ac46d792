// AVX2 + FMA builds of the LowBitMatMul loops (see lowbit.h); compiled with -mavx2 -mfma and chosen at kernel
// creation only where the CPU has both (HasAvx2Fma).
//
// Batch-1, 4 bits: four columns at a time share each load of x (which stays in L1); a chunk of 32 codes is one
// 16-byte load, split into nibbles by and/shift, widened to int32 and converted to float, and FMAed against
// x in two accumulators per column (8 independent FMA chains hide the FMA latency). At the end of a group the
// partial sums are scaled once (acc += scale * partial), and one horizontal sum per column remains.
#include <immintrin.h>

#define LOWBIT_IMPL avx2
#include "lowbit_impl.h"

namespace onnxopt {
namespace lowbit {

namespace {

inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 Codes(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }

// Partial sums of one chunk of column c: pa += q[0..16) x[0..16), pb += q[16..32) x[16..32).
inline void Chunk(const uint8_t* p, __m256 x0, __m256 x1, __m256 x2, __m256 x3, __m256& pa, __m256& pb) {
  const __m128i mask = _mm_set1_epi8(15);
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i lo = _mm_and_si128(v, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
  pa = _mm256_fmadd_ps(Codes(lo), x0, pa);
  pb = _mm256_fmadd_ps(Codes(hi), x2, pb);
  pa = _mm256_fmadd_ps(Codes(_mm_srli_si128(lo, 8)), x1, pa);
  pb = _mm256_fmadd_ps(Codes(_mm_srli_si128(hi, 8)), x3, pb);
}

template <int kCols>
inline void Gemv4Block(const Weights& w, const float* x, const float* sumx, int64_t n, float* y) {
  const int64_t per_group = w.group / kChunk;
  const uint8_t* p[kCols];
  __m256 acc[kCols];
  float zero_term[kCols];
  for (int c = 0; c < kCols; ++c) {
    p[c] = w.codes.data() + (n + c) * w.col_bytes;
    acc[c] = _mm256_setzero_ps();
    zero_term[c] = 0.0f;
  }
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256 pa[kCols], pb[kCols];
    for (int c = 0; c < kCols; ++c) pa[c] = pb[c] = _mm256_setzero_ps();
    for (int64_t ch = 0; ch < per_group; ++ch) {
      const float* xc = x + (g * per_group + ch) * kChunk;
      const __m256 x0 = _mm256_loadu_ps(xc), x1 = _mm256_loadu_ps(xc + 8);
      const __m256 x2 = _mm256_loadu_ps(xc + 16), x3 = _mm256_loadu_ps(xc + 24);
      for (int c = 0; c < kCols; ++c) {
        Chunk(p[c], x0, x1, x2, x3, pa[c], pb[c]);
        p[c] += 16;
      }
    }
    for (int c = 0; c < kCols; ++c) {
      const int64_t i = (n + c) * w.groups + g;
      acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(w.scale[i]), _mm256_add_ps(pa[c], pb[c]), acc[c]);
      zero_term[c] += w.scale_zero[i] * sumx[g];
    }
  }
  for (int c = 0; c < kCols; ++c) y[n + c] = HSum(acc[c]) - zero_term[c];
}

void Gemv4(const Weights& w, const float* x, const float* sumx, int64_t n0, int64_t n1, float* y) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) Gemv4Block<4>(w, x, sumx, n, y);
  for (; n < n1; ++n) Gemv4Block<1>(w, x, sumx, n, y);
}

}  // namespace

const Kernels& Avx2Kernels() {
  static const Kernels k{Gemv4, avx2::GemvGeneric, avx2::Dequant, avx2::Tile};
  return k;
}

}  // namespace lowbit
}  // namespace onnxopt
