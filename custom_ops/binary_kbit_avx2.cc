// The AVX2 build of the k-bit loops (binary_kbit.h; compiled with -mavx2 -mfma, chosen at run time).
//
// Codes: 8 floats at a time, (x - t) r clamped with max/min (a NaN becomes 0: vmaxps returns its second
// operand) and converted with vcvtps2dq (round half to even, the default MXCSR mode). Popcounts: the nibble
// lookup (vpshufb) on 256-bit words into byte counters, summed with vpsadbw every 31 words at most; the planes
// are combined by Horner's rule on the 64-bit totals (doubled before each lower plane).
#include <immintrin.h>

#include <cstring>

#include "binary.h"
#include "binary_count_avx2.h"
#include "binary_kbit.h"

namespace onnxopt {
namespace binary {
namespace kbit {
namespace {

inline int64_t HSum32(__m256i v) {
  alignas(32) int32_t l[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l), v);
  int64_t s = 0;
  for (const int32_t x : l) s += x;
  return s;
}

// Codes of 8 values (x - t) r as int32 lanes.
inline __m256i Codes(__m256 x, __m256 t, __m256 r, __m256 levels) {
  const __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_sub_ps(x, t), r), _mm256_setzero_ps()), levels);
  return _mm256_cvtps_epi32(v);
}

inline uint32_t ScalarCode(float x, float t, float r, float levels) {
  const __m128 v = _mm_min_ss(_mm_max_ss(_mm_set_ss((x - t) * r), _mm_setzero_ps()), _mm_set_ss(levels));
  return static_cast<uint32_t>(_mm_cvtss_si32(v));
}

// Eight consecutive values' bit i of their codes sits in the sign bit of lane l after a shift by 31 - i, so
// vmovmskps gathers one byte of plane i.
int64_t PackMatRow(const float* x, const float* t, int64_t K, float r, int bits, int64_t words, uint64_t* out) {
  std::memset(out, 0, static_cast<size_t>(bits * words) * sizeof(uint64_t));
  const __m256 vr = _mm256_set1_ps(r), levels = _mm256_set1_ps(static_cast<float>((1 << bits) - 1));
  __m256i sum = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256i u = Codes(_mm256_loadu_ps(x + k), _mm256_loadu_ps(t + k), vr, levels);
    sum = _mm256_add_epi32(sum, u);
    for (int i = 0; i < bits; ++i) {
      const __m256i s = _mm256_sll_epi32(u, _mm_cvtsi32_si128(31 - i));
      const uint64_t byte = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(s)));
      out[i * words + k / kWord] |= byte << (k % kWord);
    }
  }
  int64_t total = 0;
  for (; k < K; ++k) {
    const uint32_t u = ScalarCode(x[k], t[k], r, static_cast<float>((1 << bits) - 1));
    total += u;
    for (int i = 0; i < bits; ++i) out[i * words + k / kWord] |= uint64_t{(u >> i) & 1u} << (k % kWord);
  }
  return total + HSum32(sum);  // lanes: at most K / 8 codes of 255 each, checked below 2^31 at creation
}

void PlaneCount(const uint64_t* bits, int64_t words, const uint64_t* a, int planes, int64_t n0, int64_t n1,
                int32_t* counts) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t c = 0;
    for (int i = planes - 1; i >= 0; --i) c = 2 * c + avx2::AndCount(a + i * words, bits + n * words, words);
    counts[n - n0] = static_cast<int32_t>(c);
  }
}

// 8 pixels at a time: per word, the 64 channels as two 32-bit halves per pixel lane; channels from the highest
// down shift the earlier ones up, one accumulator per plane.
void PackConvRow(const float* image, const float* t, int64_t C, int64_t H, int64_t W, int64_t iy, float r, int bits,
                 int64_t cw, int64_t plane, uint64_t* out, int32_t* code_sum) {
  for (int64_t w = 0; w < bits * cw; ++w) std::memset(out + w * plane, 0, static_cast<size_t>(W) * sizeof(uint64_t));
  const float levels_f = static_cast<float>((1 << bits) - 1);
  const __m256 vr = _mm256_set1_ps(r), levels = _mm256_set1_ps(levels_f);
  const __m256i one = _mm256_set1_epi32(1);
  int64_t ix = 0;
  for (; ix + 8 <= W; ix += 8) {
    __m256i sum = _mm256_setzero_si256();
    for (int64_t w = 0; w < cw; ++w) {
      __m256i half[2][kMaxBits];
      for (int h = 0; h < 2; ++h) {
        const int64_t c0 = w * kWord + 32 * h, c1 = c0 + 32 < C ? c0 + 32 : C;
        for (int i = 0; i < bits; ++i) half[h][i] = _mm256_setzero_si256();
        for (int64_t c = c1 - 1; c >= c0; --c) {
          const __m256i u = Codes(_mm256_loadu_ps(image + (c * H + iy) * W + ix), _mm256_set1_ps(t[c]), vr, levels);
          sum = _mm256_add_epi32(sum, u);
          for (int i = 0; i < bits; ++i) {
            const __m256i bit = _mm256_and_si256(_mm256_srl_epi32(u, _mm_cvtsi32_si128(i)), one);
            half[h][i] = _mm256_or_si256(_mm256_slli_epi32(half[h][i], 1), bit);
          }
        }
      }
      for (int i = 0; i < bits; ++i) {
        alignas(32) uint32_t lo[8], hi[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lo), half[0][i]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(hi), half[1][i]);
        uint64_t* o = out + (i * cw + w) * plane + ix;
        for (int l = 0; l < 8; ++l) o[l] = uint64_t{lo[l]} | uint64_t{hi[l]} << 32;
      }
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(code_sum + ix), sum);
  }
  for (; ix < W; ++ix) {
    int32_t s = 0;
    for (int64_t c = 0; c < C; ++c) {
      const uint32_t u = ScalarCode(image[(c * H + iy) * W + ix], t[c], r, levels_f);
      s += static_cast<int32_t>(u);
      for (int i = 0; i < bits; ++i) out[(i * cw + c / kWord) * plane + ix] |= uint64_t{(u >> i) & 1u} << (c % kWord);
    }
    code_sum[ix] = s;
  }
}

// kPix output pixels from ox, the eight filters of group g (two 256-bit halves of four filters): the sign
// mode's count loop per bit plane, the counts doubled before each lower plane (Horner).
template <int kPix>
inline void ConvBlock(const ConvPlan& p, const uint64_t* px, int64_t g, int64_t ox, int32_t* counts) {
  __m256i total[kPix][2];
  for (int i = 0; i < kPix; ++i) total[i][0] = total[i][1] = _mm256_setzero_si256();
  for (int b = p.bits - 1; b >= 0; --b) {
    for (int i = 0; i < kPix; ++i)
      for (int k = 0; k < 2; ++k) total[i][k] = _mm256_add_epi64(total[i][k], total[i][k]);
    avx2::AddCounts<kPix>(p, px + b * p.bit_stride, g, total);
  }
  avx2::StoreCounts<kPix>(total, g, p.ow, ox, counts);
}

void ConvRow(const ConvPlan& p, const uint64_t* x, int64_t oy, int32_t* counts) {
  const uint64_t* row = x + oy * p.row_step;
  int64_t ox = 0;
  for (; ox + 4 <= p.ow; ox += 4) {
    for (int64_t g = 0; g < p.groups; ++g) ConvBlock<4>(p, row + ox * p.pixel_step, g, ox, counts);
  }
  for (; ox < p.ow; ++ox) {
    for (int64_t g = 0; g < p.groups; ++g) ConvBlock<1>(p, row + ox * p.pixel_step, g, ox, counts);
  }
}

void ScaleRow(const int32_t* c, const float* u, int64_t n, float sp, float sq, float bias, float* y) {
  const __m256 vp = _mm256_set1_ps(sp), vq = _mm256_set1_ps(sq), vb = _mm256_set1_ps(bias);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 cv = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i)));
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vp, cv, _mm256_fmadd_ps(vq, _mm256_loadu_ps(u + i), vb)));
  }
  for (; i < n; ++i) y[i] = sp * static_cast<float>(c[i]) + (sq * u[i] + bias);
}

}  // namespace

const Kernels& Avx2Kernels() {
  static const Kernels k{PackMatRow, PlaneCount, PackConvRow, ConvRow, ScaleRow};
  return k;
}

}  // namespace kbit
}  // namespace binary
}  // namespace onnxopt
