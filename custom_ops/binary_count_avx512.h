// The AVX-512 VPOPCNTDQ count loop at stride 1, shared by BinaryConv's sign mode (binary_avx512.cc) and its
// k-bit mode (binary_kbit_avx512.cc, one call per bit plane). Include only after a
// `#pragma GCC target(...)` that enables avx512f and avx512vpopcntdq.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "binary.h"

namespace onnxopt {
namespace binary {
namespace avx512 {

// Stride 1: eight consecutive output pixels read eight consecutive words of each word plane, one 512-bit load
// per (tap, word), ANDed with each of kG x 8 filters' broadcast word, into acc[filter] (eight pixels' counts).
// `mask` covers the pixels left in the row. Plan: a ConvPlan of either mode (cw, taps, wgroups, offsets).
// Always inlined and unrolled: acc[] must become registers, not a stack array stored at every step.
template <int kG, class Plan>
__attribute__((always_inline)) inline void CountBlock(const Plan& p, const uint64_t* px, int64_t g, __mmask8 mask,
                                                      __m512i* acc) {
  constexpr int kF = kG * kGroup;
  const int64_t span = p.taps * p.cw;
  const uint64_t* wg = p.wgroups + g * span * kGroup;
#pragma GCC unroll 16
  for (int f = 0; f < kF; ++f) acc[f] = _mm512_setzero_si512();
  for (int64_t j = 0; j < span; ++j) {
    const __m512i xv = _mm512_maskz_loadu_epi64(mask, px + p.offsets[j]);
#pragma GCC unroll 2
    for (int k = 0; k < kG; ++k) {
      const uint64_t* w = wg + (k * span + j) * kGroup;
#pragma GCC unroll 8
      for (int f = 0; f < kGroup; ++f) {
        const __m512i wv = _mm512_set1_epi64(static_cast<long long>(w[f]));
        acc[k * kGroup + f] = _mm512_add_epi64(acc[k * kGroup + f], _mm512_popcnt_epi64(_mm512_and_si512(xv, wv)));
      }
    }
  }
}

}  // namespace avx512
}  // namespace binary
}  // namespace onnxopt
