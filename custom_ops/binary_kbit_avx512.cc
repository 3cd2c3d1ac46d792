// The k-bit count loops on AVX-512 VPOPCNTDQ (binary_kbit.h): vpopcntq on 512-bit ANDs into 64-bit counters,
// which need no flushing; planes combined by Horner's rule (counters doubled before each lower plane), so each
// plane costs what one XNOR-mode pass costs: AND (with the broadcast folded in), popcount, add. BinaryConv with
// stride 1 keeps eight output pixels in the lanes (one 512-bit load of a plane's words per (tap, word), each
// filter's word broadcast); other strides keep eight filters in the lanes. BinaryConv's packing tests 16
// pixels' codes per plane into masks; BinaryMatMul's packing is AVX2's.
// Chosen at run time (binary::HasAvx512Popcount); compiled for these instructions by the pragma below only.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,popcnt,avx512f,avx512vpopcntdq")
#include <immintrin.h>
// gcc 12's AVX-512 headers fill unused operands with a self-initialized "undefined" vector and then warn about
// it in every inlined intrinsic (max/min/cvt/unpack); nothing here reads an uninitialized value.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "binary.h"
#include "binary_count_avx512.h"
#include "binary_kbit.h"

namespace onnxopt {
namespace binary {
namespace kbit {
namespace {

inline int64_t Reduce(__m512i v) {
  alignas(64) int64_t l[8];
  _mm512_store_si512(l, v);
  int64_t s = 0;
  for (const int64_t x : l) s += x;
  return s;
}

// One output column: the planes side by side (one weight load serves every plane), kBits counters.
template <int kBits>
void PlaneCountBits(const uint64_t* bits, int64_t words, const uint64_t* a, int64_t n0, int64_t n1, int32_t* counts) {
  const int64_t vec = words / 8;
  const __mmask8 tail = static_cast<__mmask8>((1u << (words % 8)) - 1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint64_t* b = bits + n * words;
    __m512i acc[kBits];
    for (int i = 0; i < kBits; ++i) acc[i] = _mm512_setzero_si512();
    for (int64_t v = 0; v < vec; ++v) {
      const __m512i w = _mm512_loadu_si512(b + 8 * v);
      for (int i = 0; i < kBits; ++i) {
        const __m512i x = _mm512_loadu_si512(a + i * words + 8 * v);
        acc[i] = _mm512_add_epi64(acc[i], _mm512_popcnt_epi64(_mm512_and_si512(w, x)));
      }
    }
    if (tail != 0) {
      const __m512i w = _mm512_maskz_loadu_epi64(tail, b + 8 * vec);
      for (int i = 0; i < kBits; ++i) {
        const __m512i x = _mm512_maskz_loadu_epi64(tail, a + i * words + 8 * vec);
        acc[i] = _mm512_add_epi64(acc[i], _mm512_popcnt_epi64(_mm512_and_si512(w, x)));
      }
    }
    __m512i c = acc[kBits - 1];
    for (int i = kBits - 2; i >= 0; --i) c = _mm512_add_epi64(_mm512_add_epi64(c, c), acc[i]);
    counts[n - n0] = static_cast<int32_t>(Reduce(c));
  }
}

void PlaneCount(const uint64_t* bits, int64_t words, const uint64_t* a, int planes, int64_t n0, int64_t n1,
                int32_t* counts) {
  switch (planes) {
    case 2: return PlaneCountBits<2>(bits, words, a, n0, n1, counts);
    case 3: return PlaneCountBits<3>(bits, words, a, n0, n1, counts);
    case 4: return PlaneCountBits<4>(bits, words, a, n0, n1, counts);
    case 5: return PlaneCountBits<5>(bits, words, a, n0, n1, counts);
    case 6: return PlaneCountBits<6>(bits, words, a, n0, n1, counts);
    case 7: return PlaneCountBits<7>(bits, words, a, n0, n1, counts);
    default: return PlaneCountBits<8>(bits, words, a, n0, n1, counts);
  }
}

// Stride 1: kG x 8 filters, the eight pixels from ox in the lanes (`mask`: the pixels left in the row).
// Every loop over counters is unrolled: a counter array indexed at run time would live on the stack.
template <int kG>
inline void PixelBlock(const ConvPlan& p, const uint64_t* px, int64_t g, int64_t ox, __mmask8 mask, int32_t* counts) {
  constexpr int kF = kG * kGroup;
  __m512i acc[kF];
  #pragma GCC unroll 16
  for (int f = 0; f < kF; ++f) acc[f] = _mm512_setzero_si512();
  for (int b = p.bits - 1; b >= 0; --b) {
    // The plane's counts in their own registers (counters live across the plane loop would be spilled on
    // every step), then Horner: acc = 2 acc + plane.
    const uint64_t* xb = px + b * p.bit_stride;
    __m512i pc[kF];
    avx512::CountBlock<kG>(p, xb, g, mask, pc);
    #pragma GCC unroll 16
    for (int f = 0; f < kF; ++f) acc[f] = _mm512_add_epi64(_mm512_add_epi64(acc[f], acc[f]), pc[f]);
  }
  #pragma GCC unroll 16
  for (int f = 0; f < kF; ++f) _mm512_mask_cvtepi64_storeu_epi32(counts + (g * kGroup + f) * p.ow + ox, mask, acc[f]);
}

// Other strides: kPix pixels from ox (their words broadcast), kG groups of eight filters in the lanes.
template <int kPix, int kG>
inline void FilterBlock(const ConvPlan& p, const uint64_t* px, int64_t g, int64_t ox, int32_t* counts) {
  const int64_t span = p.taps * p.cw;
  const uint64_t* wg = p.wgroups + g * span * kGroup;
  __m512i acc[kPix][kG];
  #pragma GCC unroll 4
  for (int i = 0; i < kPix; ++i)
    #pragma GCC unroll 2
    for (int k = 0; k < kG; ++k) acc[i][k] = _mm512_setzero_si512();
  for (int b = p.bits - 1; b >= 0; --b) {
    const uint64_t* xb = px + b * p.bit_stride;
    __m512i pc[kPix][kG];  // the plane's counts (see PixelBlock)
    #pragma GCC unroll 4
    for (int i = 0; i < kPix; ++i)
      #pragma GCC unroll 2
      for (int k = 0; k < kG; ++k) pc[i][k] = _mm512_setzero_si512();
    for (int64_t j = 0; j < span; ++j) {
      __m512i w[kG];
      #pragma GCC unroll 2
      for (int k = 0; k < kG; ++k) w[k] = _mm512_loadu_si512(wg + (k * span + j) * kGroup);
      const int32_t off = p.offsets[j];
      #pragma GCC unroll 4
      for (int i = 0; i < kPix; ++i) {
        const __m512i xv = _mm512_set1_epi64(static_cast<long long>(xb[off + i * p.pixel_step]));
        #pragma GCC unroll 2
        for (int k = 0; k < kG; ++k) pc[i][k] = _mm512_add_epi64(pc[i][k], _mm512_popcnt_epi64(_mm512_and_si512(xv, w[k])));
      }
    }
    #pragma GCC unroll 4
    for (int i = 0; i < kPix; ++i)
      #pragma GCC unroll 2
      for (int k = 0; k < kG; ++k) acc[i][k] = _mm512_add_epi64(_mm512_add_epi64(acc[i][k], acc[i][k]), pc[i][k]);
  }
  #pragma GCC unroll 4
  for (int i = 0; i < kPix; ++i) {
    #pragma GCC unroll 2
    for (int k = 0; k < kG; ++k) {
      alignas(64) int64_t c[kGroup];
      _mm512_store_si512(c, acc[i][k]);
      #pragma GCC unroll 8
      for (int f = 0; f < kGroup; ++f) counts[((g + k) * kGroup + f) * p.ow + ox + i] = static_cast<int32_t>(c[f]);
    }
  }
}

template <int kPix>
inline void FilterPixels(const ConvPlan& p, const uint64_t* px, int64_t ox, int32_t* counts) {
  int64_t g = 0;
  for (; g + 2 <= p.groups; g += 2) FilterBlock<kPix, 2>(p, px, g, ox, counts);
  if (g < p.groups) FilterBlock<kPix, 1>(p, px, g, ox, counts);
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
  for (; ox + 4 <= p.ow; ox += 4) FilterPixels<4>(p, row + ox * p.pixel_step, ox, counts);
  for (; ox < p.ow; ++ox) FilterPixels<1>(p, row + ox * p.pixel_step, ox, counts);
}

// 16 pixels at a time (the last ones masked): per channel, the codes as int32 lanes, and per plane one test
// into a mask that ORs the channel's bit into the plane's 32-bit lanes (channels c0..c0+31 of a half word); the
// two halves are then interleaved into the pixels' 64-bit words. Every word of the row is written.
void PackConvRow(const float* image, const float* t, int64_t C, int64_t H, int64_t W, int64_t iy, float r, int bits,
                 int64_t cw, int64_t plane, uint64_t* out, int32_t* code_sum) {
  const __m512 vr = _mm512_set1_ps(r), levels = _mm512_set1_ps(static_cast<float>((1 << bits) - 1));
  const __m512 zero = _mm512_setzero_ps();
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int64_t ix = 0; ix < W; ix += 16) {
    const __mmask16 m = static_cast<__mmask16>(W - ix >= 16 ? 0xffff : (1u << (W - ix)) - 1);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t w = 0; w < cw; ++w) {
      __m512i half[2][kMaxBits];
      for (int h = 0; h < 2; ++h) {
        const int64_t c0 = w * kWord + 32 * h, c1 = c0 + 32 < C ? c0 + 32 : C;
        for (int i = 0; i < bits; ++i) half[h][i] = _mm512_setzero_si512();
        for (int64_t c = c0; c < c1; ++c) {
          const __m512 x = _mm512_maskz_loadu_ps(m, image + (c * H + iy) * W + ix);
          const __m512 v = _mm512_mul_ps(_mm512_sub_ps(x, _mm512_set1_ps(t[c])), vr);
          const __m512i u = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, zero), levels));
          sum = _mm512_add_epi32(sum, u);
          const __m512i bit = _mm512_set1_epi32(static_cast<int>(1u << (c - c0)));
          for (int i = 0; i < bits; ++i) {
            const __mmask16 on = _mm512_test_epi32_mask(u, _mm512_set1_epi32(1 << i));
            half[h][i] = _mm512_mask_or_epi32(half[h][i], on, half[h][i], bit);
          }
        }
      }
      for (int i = 0; i < bits; ++i) {
        const __m512i lo = _mm512_unpacklo_epi32(half[0][i], half[1][i]);  // pixels 0 1 4 5 8 9 12 13
        const __m512i hi = _mm512_unpackhi_epi32(half[0][i], half[1][i]);  // pixels 2 3 6 7 10 11 14 15
        uint64_t* o = out + (i * cw + w) * plane + ix;
        _mm512_mask_storeu_epi64(o, static_cast<__mmask8>(m), _mm512_permutex2var_epi64(lo, first, hi));
        _mm512_mask_storeu_epi64(o + 8, static_cast<__mmask8>(m >> 8), _mm512_permutex2var_epi64(lo, second, hi));
      }
    }
    _mm512_mask_storeu_epi32(code_sum + ix, m, sum);
  }
}

}  // namespace

const Kernels& Avx512Kernels() {
  static const Kernels k{Avx2Kernels().pack_mat_row, PlaneCount, PackConvRow, ConvRow, Avx2Kernels().scale_row};
  return k;
}

}  // namespace kbit
}  // namespace binary
}  // namespace onnxopt

#endif  // x86
