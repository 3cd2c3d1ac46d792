// The AVX2 build of the binary kernels' loops (binary.h; compiled with -mavx2 -mfma, chosen at run time).
//
// The popcount and count loops are in binary_count_avx2.h (shared with the k-bit mode). BinaryConv's loop keeps 4 output pixels x 8 filters (two 256-bit weight loads, each four
// filters' word for one tap) in eight byte accumulators: every weight load serves four pixels and every
// broadcast input word eight filters.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "binary.h"
#include "binary_count_avx2.h"

namespace onnxopt {
namespace binary {
namespace {

inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Masks of 8 lanes from 8 bits: lane l of Expand(word, g) has bit 8 g + l of `word` in its sign bit.
inline __m256 Expand(__m256i word, __m256i shift) { return _mm256_castsi256_ps(_mm256_sllv_epi32(word, shift)); }

template <int kRows>
void PartialRows(const uint64_t* bits, int64_t words, const float* x, int64_t ldx, int64_t n0, int64_t n1,
                 float* s1, int64_t lds) {
  __m256i shift[4];
  for (int g = 0; g < 4; ++g) shift[g] = _mm256_setr_epi32(31 - 8 * g, 30 - 8 * g, 29 - 8 * g, 28 - 8 * g, 27 - 8 * g, 26 - 8 * g, 25 - 8 * g, 24 - 8 * g);
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* b = reinterpret_cast<const uint32_t*>(bits + n * words);
    __m256 acc[kRows][2];
    for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = zero;
    for (int64_t h = 0; h < 2 * words; ++h) {  // 32 weights per step
      const __m256i wv = _mm256_set1_epi32(static_cast<int32_t>(b[h]));
      const float* xh = x + h * 32;
      for (int g = 0; g < 4; ++g) {
        const __m256 m = Expand(wv, shift[g]);
        for (int r = 0; r < kRows; ++r) {
          acc[r][g & 1] = _mm256_add_ps(acc[r][g & 1], _mm256_blendv_ps(zero, _mm256_loadu_ps(xh + r * ldx + 8 * g), m));
        }
      }
    }
    for (int r = 0; r < kRows; ++r) s1[r * lds + n - n0] = HSum(_mm256_add_ps(acc[r][0], acc[r][1]));
  }
}

void Partial(const uint64_t* bits, int64_t words, const float* x, int64_t ldx, int rows, int64_t n0, int64_t n1,
             float* s1, int64_t lds) {
  switch (rows) {
    case 1: return PartialRows<1>(bits, words, x, ldx, n0, n1, s1, lds);
    case 2: return PartialRows<2>(bits, words, x, ldx, n0, n1, s1, lds);
    case 3: return PartialRows<3>(bits, words, x, ldx, n0, n1, s1, lds);
    default: return PartialRows<4>(bits, words, x, ldx, n0, n1, s1, lds);
  }
}

void AndCount(const uint64_t* bits, int64_t words, const uint64_t* a, int64_t n0, int64_t n1, int32_t* counts) {
  for (int64_t n = n0; n < n1; ++n) counts[n - n0] = static_cast<int32_t>(avx2::AndCount(a, bits + n * words, words));
}

// kPix output pixels from ox, the eight filters of group g (two 256-bit halves of four filters).
template <int kPix>
inline void ConvBlock(const ConvPlan& p, const uint64_t* px, int64_t g, int64_t ox, int32_t* counts) {
  __m256i total[kPix][2];
  for (int i = 0; i < kPix; ++i) total[i][0] = total[i][1] = _mm256_setzero_si256();
  avx2::AddCounts<kPix>(p, px, g, total);
  avx2::StoreCounts<kPix>(total, g, p.ow, ox, counts);
}

template <int kPix>
inline void ConvPixels(const ConvPlan& p, const uint64_t* px, int64_t ox, int32_t* counts) {
  for (int64_t g = 0; g < p.groups; ++g) ConvBlock<kPix>(p, px, g, ox, counts);
}

void ConvRow(const ConvPlan& p, const uint64_t* x, int64_t oy, int32_t* counts) {
  const uint64_t* row = x + oy * p.row_step;
  int64_t ox = 0;
  for (; ox + 4 <= p.ow; ox += 4) ConvPixels<4>(p, row + ox * p.pixel_step, ox, counts);
  for (; ox < p.ow; ++ox) ConvPixels<1>(p, row + ox * p.pixel_step, ox, counts);
}

// 8 pixels at a time: the 64 channels of a word as two 32-bit halves per pixel lane, built by shift-and-or,
// then stored as the pixels' words in the word's plane.
void PackRow(const float* image, const float* t, int64_t C, int64_t H, int64_t W, int64_t iy, int64_t cw,
             int64_t plane, uint64_t* out, float* abs_sum, int32_t* ones) {
  for (int64_t w = 0; w < cw; ++w) std::memset(out + w * plane, 0, static_cast<size_t>(W) * sizeof(uint64_t));
  const __m256 zero = _mm256_setzero_ps(), abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int64_t ix = 0;
  for (; ix + 8 <= W; ix += 8) {
    __m256 s = zero;
    for (int64_t w = 0; w < cw; ++w) {
      __m256i half[2];
      for (int h = 0; h < 2; ++h) {
        // Channels from the highest down, each shifting the earlier ones up: channel c lands on bit c % 32.
        const int64_t c0 = w * kWord + 32 * h, c1 = c0 + 32 < C ? c0 + 32 : C;
        __m256i acc = _mm256_setzero_si256();
        for (int64_t c = c1 - 1; c >= c0; --c) {
          const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(image + (c * H + iy) * W + ix), _mm256_set1_ps(t[c]));
          const __m256i ge = _mm256_castps_si256(_mm256_cmp_ps(v, zero, _CMP_GE_OQ));
          acc = _mm256_or_si256(_mm256_slli_epi32(acc, 1), _mm256_srli_epi32(ge, 31));
          s = _mm256_add_ps(s, _mm256_and_ps(v, abs_mask));
        }
        half[h] = acc;
      }
      alignas(32) uint32_t lo[8], hi[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lo), half[0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(hi), half[1]);
      for (int l = 0; l < 8; ++l) out[w * plane + ix + l] = uint64_t{lo[l]} | uint64_t{hi[l]} << 32;
    }
    _mm256_storeu_ps(abs_sum + ix, s);
  }
  for (; ix < W; ++ix) {
    float s = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      const float v = image[(c * H + iy) * W + ix];
      if (v >= t[c]) out[c / kWord * plane + ix] |= uint64_t{1} << (c % kWord);
      s += std::fabs(v - t[c]);
    }
    abs_sum[ix] = s;
  }
  for (int64_t ix = 0; ix < W; ++ix) {
    int64_t c = 0;
    for (int64_t w = 0; w < cw; ++w) c += _mm_popcnt_u64(out[w * plane + ix]);
    ones[ix] = static_cast<int32_t>(c);
  }
}

void ScaleRow(const int32_t* c, const float* kappa, const float* d0, int64_t n, float two_p, float q, float pb,
              float bias, float* y) {
  const __m256 vp = _mm256_set1_ps(two_p), vq = _mm256_set1_ps(q), vpb = _mm256_set1_ps(pb), vb = _mm256_set1_ps(bias);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 cv = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i)));
    const __m256 inner = _mm256_fmadd_ps(vp, cv, _mm256_fmsub_ps(vq, _mm256_loadu_ps(d0 + i), vpb));
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(_mm256_loadu_ps(kappa + i), inner, vb));
  }
  for (; i < n; ++i) y[i] = kappa[i] * (two_p * static_cast<float>(c[i]) + q * d0[i] - pb) + bias;
}

}  // namespace

const Kernels& Avx2Kernels() {
  static const Kernels k{Partial, AndCount, ConvRow, PackRow, ScaleRow, ConvThenScale<ConvRow, ScaleRow>};
  return k;
}

}  // namespace binary
}  // namespace onnxopt
