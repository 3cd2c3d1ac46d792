// The AVX2 count loop shared by BinaryConv's sign mode (binary_avx2.cc) and its k-bit mode
// (binary_kbit_avx2.cc, one call per bit plane). Include only from files compiled with -mavx2.
//
// Popcount of 256 bits: each byte's two nibbles looked up in a 16-entry table with vpshufb and added, so a
// byte lane holds at most 8; lanes are summed into 64-bit counts with vpsadbw before they can overflow
// (kFlush words of 8).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "binary.h"

namespace onnxopt {
namespace binary {
namespace avx2 {

constexpr int64_t kFlush = 31;  // byte accumulators take 31 additions of at most 8

inline __m256i Lut() {
  return _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
}

// Per-byte popcount of v (each byte 0..8).
inline __m256i ByteCount(__m256i v, __m256i lut, __m256i low) {
  const __m256i lo = _mm256_and_si256(v, low);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

inline int64_t HSum64(__m256i v) {
  const __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

// popcount(a AND b) over `words` 64-bit words: BinaryMatMul's count of one weight row against one packed row
// (in k-bit mode, one bit plane of it).
inline int64_t AndCount(const uint64_t* a, const uint64_t* b, int64_t words) {
  const __m256i lut = Lut(), low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
  const int64_t vec = words / 4;
  __m256i total = zero;
  for (int64_t v0 = 0; v0 < vec; v0 += kFlush) {
    const int64_t v1 = v0 + kFlush < vec ? v0 + kFlush : vec;
    __m256i acc = zero;
    for (int64_t v = v0; v < v1; ++v) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 4 * v));
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 4 * v));
      acc = _mm256_add_epi8(acc, ByteCount(_mm256_and_si256(w, xv), lut, low));
    }
    total = _mm256_add_epi64(total, _mm256_sad_epu8(acc, zero));
  }
  int64_t c = HSum64(total);
  for (int64_t w = 4 * vec; w < words; ++w) c += _mm_popcnt_u64(a[w] & b[w]);
  return c;
}

// total[i][h] += popcount(x AND w) over every (tap, word) of the receptive field, for kPix output pixels from
// px (words px[offsets[j] + i pixel_step]) and the eight filters of group g (halves h of four filters, 64-bit
// lanes). Plan: a ConvPlan of either mode (cw, taps, pixel_step, wgroups, offsets).
template <int kPix, class Plan>
inline void AddCounts(const Plan& p, const uint64_t* px, int64_t g, __m256i (&total)[kPix][2]) {
  const __m256i lut = Lut(), low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
  const int64_t span = p.taps * p.cw;
  const uint64_t* wg = p.wgroups + g * span * kGroup;
  for (int64_t j0 = 0; j0 < span; j0 += kFlush) {
    const int64_t j1 = j0 + kFlush < span ? j0 + kFlush : span;
    __m256i acc[kPix][2];
    for (int i = 0; i < kPix; ++i) acc[i][0] = acc[i][1] = zero;
    for (int64_t j = j0; j < j1; ++j) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + j * kGroup));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + j * kGroup + 4));
      const int32_t off = p.offsets[j];
      for (int i = 0; i < kPix; ++i) {
        const __m256i xv = _mm256_set1_epi64x(static_cast<int64_t>(px[off + i * p.pixel_step]));
        acc[i][0] = _mm256_add_epi8(acc[i][0], ByteCount(_mm256_and_si256(xv, w0), lut, low));
        acc[i][1] = _mm256_add_epi8(acc[i][1], ByteCount(_mm256_and_si256(xv, w1), lut, low));
      }
    }
    for (int i = 0; i < kPix; ++i)
      for (int k = 0; k < 2; ++k) total[i][k] = _mm256_add_epi64(total[i][k], _mm256_sad_epu8(acc[i][k], zero));
  }
}

// The eight filters' counts of each of kPix pixels into counts[(g 8 + f) ow + ox + i].
template <int kPix>
inline void StoreCounts(const __m256i (&total)[kPix][2], int64_t g, int64_t ow, int64_t ox, int32_t* counts) {
  for (int i = 0; i < kPix; ++i) {
    alignas(32) int64_t c[kGroup];
    _mm256_store_si256(reinterpret_cast<__m256i*>(c), total[i][0]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(c + 4), total[i][1]);
    for (int f = 0; f < kGroup; ++f) counts[(g * kGroup + f) * ow + ox + i] = static_cast<int32_t>(c[f]);
  }
}

}  // namespace avx2
}  // namespace binary
}  // namespace onnxopt
