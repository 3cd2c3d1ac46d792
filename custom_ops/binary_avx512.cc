// BinaryConv's count loop on AVX-512 VPOPCNTDQ: one vpopcntq counts the AND of a broadcast input word with
// the same (tap, word) of eight filters (binary.h's [M / 8][taps][cw][8] layout), into 64-bit lanes that need
// no flushing: 3 instructions per 512 binary multiply-adds, against 8 per 256 for AVX2's nibble lookup.
// With stride 1 the lanes hold eight output pixels instead (PixelBlock): each filter's counts then leave in one
// narrowing store. BinaryMatMul's partial mode: 16 weight bits are the mask of one masked add of 16 inputs.
// Chosen at run time (HasAvx512Popcount: AVX-512F and VPOPCNTDQ); the AVX2 and portable paths stay (tests run
// all three).
// Compiled for these instructions by the pragma below, not by the build's flags: only this file uses them.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,popcnt,avx512f,avx512vpopcntdq")
#include <immintrin.h>

#include <cstdlib>
#include <string>

#include "binary.h"

namespace onnxopt {
namespace binary {
namespace {

template <int kRows>
void PartialRows(const uint64_t* bits, int64_t words, const float* x, int64_t ldx, int64_t n0, int64_t n1,
                 float* s1, int64_t lds) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint64_t* b = bits + n * words;
    __m512 acc[kRows][4];
    for (int r = 0; r < kRows; ++r)
      for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
      const uint64_t v = b[w];
      const float* xw = x + w * kWord;
      for (int q = 0; q < 4; ++q) {
        const __mmask16 m = static_cast<__mmask16>(v >> (16 * q));
        for (int r = 0; r < kRows; ++r) {
          acc[r][q] = _mm512_mask_add_ps(acc[r][q], m, acc[r][q], _mm512_loadu_ps(xw + r * ldx + 16 * q));
        }
      }
    }
    for (int r = 0; r < kRows; ++r) {
      // Summed through memory: gcc 12's _mm512_reduce_add_ps trips -Wmaybe-uninitialized in its own header.
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));
      float sum = 0.0f;
      for (const float v : lanes) sum += v;
      s1[r * lds + n - n0] = sum;
    }
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

// kPix output pixels from ox, kG groups of eight filters from group g.
template <int kPix, int kG>
inline void ConvBlock(const ConvPlan& p, const uint64_t* px, int64_t g, int64_t ox, int32_t* counts) {
  const int64_t span = p.taps * p.cw;
  const uint64_t* wg = p.wgroups + g * span * kGroup;
  __m512i acc[kPix][kG];
  for (int i = 0; i < kPix; ++i)
    for (int k = 0; k < kG; ++k) acc[i][k] = _mm512_setzero_si512();
  for (int64_t j = 0; j < span; ++j) {
    __m512i w[kG];
    for (int k = 0; k < kG; ++k) w[k] = _mm512_loadu_si512(wg + (k * span + j) * kGroup);
    const int32_t off = p.offsets[j];
    for (int i = 0; i < kPix; ++i) {
      const __m512i xv = _mm512_set1_epi64(static_cast<long long>(px[off + i * p.pixel_step]));
      for (int k = 0; k < kG; ++k) acc[i][k] = _mm512_add_epi64(acc[i][k], _mm512_popcnt_epi64(_mm512_and_si512(xv, w[k])));
    }
  }
  for (int i = 0; i < kPix; ++i) {
    for (int k = 0; k < kG; ++k) {
      alignas(64) int64_t c[kGroup];
      _mm512_store_si512(c, acc[i][k]);
      for (int f = 0; f < kGroup; ++f) counts[((g + k) * kGroup + f) * p.ow + ox + i] = static_cast<int32_t>(c[f]);
    }
  }
}

template <int kPix>
inline void ConvPixels(const ConvPlan& p, const uint64_t* px, int64_t ox, int32_t* counts) {
  int64_t g = 0;
  for (; g + 2 <= p.groups; g += 2) ConvBlock<kPix, 2>(p, px, g, ox, counts);
  if (g < p.groups) ConvBlock<kPix, 1>(p, px, g, ox, counts);
}

// Stride 1: eight consecutive output pixels read eight consecutive words of each word plane, one 512-bit load
// per (tap, word), ANDed with each of kG x 8 filters' broadcast word; a filter's eight counts are then one
// narrowing store into its row of counts (no per-count stores). `mask` covers the pixels left in the row.
template <int kG>
inline void PixelBlock(const ConvPlan& p, const uint64_t* px, int64_t g, int64_t ox, __mmask8 mask, int32_t* counts) {
  constexpr int kF = kG * kGroup;
  const int64_t span = p.taps * p.cw;
  const uint64_t* wg = p.wgroups + g * span * kGroup;
  __m512i acc[kF];
  for (int f = 0; f < kF; ++f) acc[f] = _mm512_setzero_si512();
  for (int64_t j = 0; j < span; ++j) {
    const __m512i xv = _mm512_maskz_loadu_epi64(mask, px + p.offsets[j]);
    for (int k = 0; k < kG; ++k) {
      const uint64_t* w = wg + (k * span + j) * kGroup;
      for (int f = 0; f < kGroup; ++f) {
        const __m512i wv = _mm512_set1_epi64(static_cast<long long>(w[f]));
        acc[k * kGroup + f] = _mm512_add_epi64(acc[k * kGroup + f], _mm512_popcnt_epi64(_mm512_and_si512(xv, wv)));
      }
    }
  }
  for (int f = 0; f < kF; ++f) _mm512_mask_cvtepi64_storeu_epi32(counts + (g * kGroup + f) * p.ow + ox, mask, acc[f]);
}

void ConvRow(const ConvPlan& p, const uint64_t* x, int64_t oy, int32_t* counts) {
  const uint64_t* row = x + oy * p.row_step;
  if (p.pixel_step == 1) {
    for (int64_t ox = 0; ox < p.ow; ox += 8) {
      const __mmask8 mask = static_cast<__mmask8>(p.ow - ox >= 8 ? 0xff : (1u << (p.ow - ox)) - 1);
      int64_t g = 0;
      for (; g + 2 <= p.groups; g += 2) PixelBlock<2>(p, row + ox, g, ox, mask, counts);
      if (g < p.groups) PixelBlock<1>(p, row + ox, g, ox, mask, counts);
    }
    return;
  }
  int64_t ox = 0;
  for (; ox + 4 <= p.ow; ox += 4) ConvPixels<4>(p, row + ox * p.pixel_step, ox, counts);
  for (; ox < p.ow; ++ox) ConvPixels<1>(p, row + ox * p.pixel_step, ox, counts);
}

}  // namespace

const Kernels& Avx512Kernels() {
  static const Kernels k{Partial, Avx2Kernels().and_count, ConvRow, Avx2Kernels().pack_row, Avx2Kernels().scale_row};
  return k;
}

bool HasAvx512Popcount() {
  const char* off = std::getenv("ONNXOPT_DISABLE_AVX512");
  if (off != nullptr && off[0] != '\0' && std::string(off) != "0") return false;
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
  }();
  return has;
}

}  // namespace binary
}  // namespace onnxopt

#endif  // x86
