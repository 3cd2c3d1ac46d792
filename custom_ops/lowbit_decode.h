// Unpacking one packed chunk of LowBitMatMul codes (layout in lowbit.h) into int32 lanes with 256-bit
// intrinsics: shared by lowbit_avx2.cc, lowbit_gemm_avx2.cc and (through lowbit_gemm_f32.h)
// lowbit_gemm_avx512.cc. In an anonymous namespace on purpose: those files are compiled for different
// instruction sets, and an inline function with external linkage could be merged by the linker into one
// AVX-512 copy that the AVX2 build would then call.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace onnxopt {
namespace lowbit {
namespace {

// 3 bits: bit 2 of codes 8 i .. 8 i + 7 from the chunk's high-bit word, as int32 lanes worth 0 or 4.
inline __m256i HighBits(__m256i word, int i) {
  const __m256i shift = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * i));
  return _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(word, shift), _mm256_set1_epi32(1)), 2);
}

// The 32 codes of one packed chunk as int32, c[i] = codes 8 i .. 8 i + 7.
template <int kBits>
inline void DecodeChunk(const uint8_t* p, __m256i (&c)[4]) {
  if constexpr (kBits == 4) {
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    c[0] = _mm256_cvtepu8_epi32(lo);
    c[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
    c[2] = _mm256_cvtepu8_epi32(hi);
    c[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
  } else {
    const __m128i mask = _mm_set1_epi8(3);
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    for (int i = 0; i < 4; ++i) c[i] = _mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 2 * i), mask));
    if constexpr (kBits == 3) {
      uint32_t word;
      __builtin_memcpy(&word, p + 8, 4);
      const __m256i wv = _mm256_set1_epi32(static_cast<int>(word));
      for (int i = 0; i < 4; ++i) c[i] = _mm256_or_si256(c[i], HighBits(wv, i));
    }
  }
}

}  // namespace
}  // namespace lowbit
}  // namespace onnxopt
