// BinaryConv's count loop on AVX-512 VPOPCNTDQ: one vpopcntq counts the AND of a broadcast input word with
// the same (tap, word) of eight filters (binary.h's [M / 8][taps][cw][8] layout), into 64-bit lanes that need
// no flushing: 3 instructions per 512 binary multiply-adds, against 8 per 256 for AVX2's nibble lookup.
// With stride 1 the lanes hold eight output pixels instead (CountBlock): each filter's eight counts then leave
// as eight outputs, scaled in registers (ScaledBlock: 5 instructions per filter and 8 pixels, against 27 for
// the counts of a 3x3 field of 64 channels), so counts never go through memory. Packing: one compare of 16
// pixels per channel gives a mask that ORs the channel's bit into 32-bit lanes. BinaryMatMul's partial mode:
// 16 weight bits are the mask of one masked add of 16 inputs. Chosen at run time (HasAvx512Popcount:
// AVX-512F, VL and VPOPCNTDQ); the AVX2 and portable paths stay (tests run all three).
// Compiled for these instructions by the pragma below, not by the build's flags: only this file uses them.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,popcnt,avx512f,avx512vl,avx512vpopcntdq")
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "binary.h"
#include "binary_count_avx512.h"

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

using avx512::CountBlock;

// CountBlock, each filter's eight counts leaving in one narrowing store into its row of counts.
template <int kG>
inline void PixelBlock(const ConvPlan& p, const uint64_t* px, int64_t g, int64_t ox, __mmask8 mask, int32_t* counts) {
  __m512i acc[kG * kGroup];
  CountBlock<kG>(p, px, g, mask, acc);
#pragma GCC unroll 16
  for (int f = 0; f < kG * kGroup; ++f) {
    _mm512_mask_cvtepi64_storeu_epi32(counts + (g * kGroup + f) * p.ow + ox, mask, acc[f]);
  }
}

// CountBlock with the scaling fused (RowScale): each filter's eight counts leave as its eight outputs, so
// the counts never go through memory. Filters past M (the last group's padding) are not stored.
template <int kG>
inline void ScaledBlock(const ConvPlan& p, const uint64_t* px, int64_t g, int64_t ox, __mmask8 mask,
                        const RowScale& s) {
  __m512i acc[kG * kGroup];
  CountBlock<kG>(p, px, g, mask, acc);
  const __m256 kappa = _mm256_maskz_loadu_ps(mask, s.kappa + ox), d0 = _mm256_maskz_loadu_ps(mask, s.d0 + ox);
  // Unrolled, so that acc[] stays in registers: a run-time index would put it on the stack.
#pragma GCC unroll 16
  for (int f = 0; f < kG * kGroup; ++f) {
    const int64_t m = g * kGroup + f;
    if (m >= s.m) break;
    // The zero-masking form: gcc 12 warns on the plain one (an undefined register in its own header).
    const __m256 c = _mm256_cvtepi32_ps(_mm512_maskz_cvtepi64_epi32(mask, acc[f]));
    const __m256 qd = _mm256_fmsub_ps(_mm256_set1_ps(s.q[m]), d0, _mm256_set1_ps(s.pb[m]));
    const __m256 inner = _mm256_fmadd_ps(_mm256_set1_ps(s.two_p[m]), c, qd);
    _mm256_mask_storeu_ps(s.y + m * s.y_step + ox, mask, _mm256_fmadd_ps(kappa, inner, _mm256_set1_ps(s.bias[m])));
  }
}

inline __mmask8 TailMask(int64_t left) { return static_cast<__mmask8>(left >= 8 ? 0xff : (1u << left) - 1); }

void ConvRow(const ConvPlan& p, const uint64_t* x, int64_t oy, int32_t* counts) {
  const uint64_t* row = x + oy * p.row_step;
  if (p.pixel_step == 1) {
    for (int64_t ox = 0; ox < p.ow; ox += 8) {
      const __mmask8 mask = TailMask(p.ow - ox);
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

void ConvScaled(const ConvPlan& p, const uint64_t* x, int64_t oy, const RowScale& s, int32_t* counts) {
  if (p.pixel_step != 1) {
    ConvRow(p, x, oy, counts);
    const ScaleRowFn scale = Avx2Kernels().scale_row;
    for (int64_t m = 0; m < s.m; ++m) {
      scale(counts + m * p.ow, s.kappa, s.d0, p.ow, s.two_p[m], s.q[m], s.pb[m], s.bias[m], s.y + m * s.y_step);
    }
    return;
  }
  const uint64_t* row = x + oy * p.row_step;
  // Filters outer, pixels inner: each filter's output row is written as one run, not 8 pixels at a time
  // across all M rows (fewer concurrent store streams to memory), and a group's weights stay in L1.
  int64_t g = 0;
  for (; g + 2 <= p.groups; g += 2) {
    for (int64_t ox = 0; ox < p.ow; ox += 8) ScaledBlock<2>(p, row + ox, g, ox, TailMask(p.ow - ox), s);
  }
  if (g < p.groups) {
    for (int64_t ox = 0; ox < p.ow; ox += 8) ScaledBlock<1>(p, row + ox, g, ox, TailMask(p.ow - ox), s);
  }
}

// 16 pixels at a time: channel c's comparisons x >= T[c] are one 16-bit mask, which ORs bit c % 32 into the
// pixels' 32-bit lanes (two halves per word); the halves are then interleaved into the pixels' 64-bit words.
void PackRow(const float* image, const float* t, int64_t C, int64_t H, int64_t W, int64_t iy, int64_t cw,
             int64_t plane, uint64_t* out, float* abs_sum, int32_t* ones) {
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t ix = 0; ix < W; ix += 16) {
    const __mmask16 mask = static_cast<__mmask16>(W - ix >= 16 ? 0xffff : (1u << (W - ix)) - 1);
    __m512 sum = _mm512_setzero_ps();
    __m512i pc = _mm512_setzero_si512();
    for (int64_t w = 0; w < cw; ++w) {
      __m512i half[2];
      for (int h = 0; h < 2; ++h) {
        const int64_t c0 = w * kWord + 32 * h, c1 = std::min(c0 + 32, C);
        __m512i acc = _mm512_setzero_si512(), bit = _mm512_set1_epi32(1);
        for (int64_t c = c0; c < c1; ++c) {
          const __m512 v = _mm512_maskz_loadu_ps(mask, image + (c * H + iy) * W + ix), tc = _mm512_set1_ps(t[c]);
          acc = _mm512_mask_or_epi32(acc, _mm512_cmp_ps_mask(v, tc, _CMP_GE_OQ), acc, bit);
          bit = _mm512_add_epi32(bit, bit);
          sum = _mm512_add_ps(sum, _mm512_abs_ps(_mm512_sub_ps(v, tc)));
        }
        half[h] = acc;
      }
      pc = _mm512_add_epi32(pc, _mm512_add_epi32(_mm512_popcnt_epi32(half[0]), _mm512_popcnt_epi32(half[1])));
      uint64_t* o = out + w * plane + ix;
      _mm512_mask_storeu_epi64(o, static_cast<__mmask8>(mask), _mm512_permutex2var_epi32(half[0], first, half[1]));
      _mm512_mask_storeu_epi64(o + 8, static_cast<__mmask8>(mask >> 8),
                               _mm512_permutex2var_epi32(half[0], second, half[1]));
    }
    _mm512_mask_storeu_ps(abs_sum + ix, mask, sum);
    _mm512_mask_storeu_epi32(ones + ix, mask, pc);
  }
}

}  // namespace

const Kernels& Avx512Kernels() {
  static const Kernels k{Partial, Avx2Kernels().and_count, ConvRow, PackRow, Avx2Kernels().scale_row, ConvScaled};
  return k;
}

bool HasAvx512Popcount() {
  const char* off = std::getenv("ONNXOPT_DISABLE_AVX512");
  if (off != nullptr && off[0] != '\0' && std::string(off) != "0") return false;
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vpopcntdq");
  }();
  return has;
}

}  // namespace binary
}  // namespace onnxopt

#endif  // x86
