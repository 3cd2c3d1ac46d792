// AVX-512 VNNI builds of LowBitMatMul's 4-bit batch-1 loops, act_bits = 8 (GemvI8) and float (Gemv4); see
// lowbit.h for the packed layout and the math. Chosen at kernel creation only where HasAvx512(BW, VL, VNNI)
// says the CPU and OS run these instructions (and ONNXOPT_DISABLE_AVX512 is not set); every other loop is the
// AVX2 build's.
//
// A block of four columns stores each chunk of 32 codes as 4 x 16 bytes, column after column, so ONE 512-bit
// load holds a chunk of all four columns, column c in 128-bit lane c; byte j of a lane holds q[j] (low nibble)
// and q[j + 16] (high nibble). Against x[0..16) and x[16..32) broadcast to the four lanes, vpdpbusd (unsigned
// codes times signed int8 inputs, four products summed into each int32 lane) gives:
//   lo += (v & 0x0f) . x[0..16)    the low nibbles, codes 0..15 of the chunk;
//   hi += (v & 0xf0) . x[16..32)   the high nibbles left in place, i.e. 16 q[j + 16]: no shift needed, and
//                                  the sum is divided by 16 (an exact arithmetic shift) once per group.
// That is one load, two logic ops and two vpdpbusd per 4 x 32 weights, against 4 x 5 instructions for AVX2's
// vpmaddubsw loop. Int32 lane (c, i) then holds a quarter of column c's dot product; per group the four
// columns' scales are spread over their lanes by one permute and applied by one cvt + fma; the zero term,
// sum_g scale zero sumxq[g], is one 4-wide fma per group, with scale * zero formed here from the uint8 zero
// points (the same float product as Weights::scale_zero, 1 byte read per group and column instead of 4: the
// loop runs at memory speed, so bytes are time). Two pairs of accumulators (even and odd chunks)
// keep four independent vpdpbusd chains in flight.
//
// Integer range: |hi| grows by at most 4 * 240 * 127 = 121920 per chunk and lane, so it is folded into the
// group's dot product every kFold chunks (2048: 2.5e8, far from 2^31); the dot product itself is bounded by
// 15 * 127 * G / 4 per lane (G <= 2^20: 5e8).
//
// Compiled for these instructions by the pragma below, not by the build's flags: only this file uses them.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")
// gcc 12's AVX-512 headers seed results with _mm512_undefined_*() (`__Y = __Y`), which -Wmaybe-uninitialized
// reports at every inlined intrinsic of this file; the values are never read.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>

#include "lowbit.h"

namespace onnxopt {
namespace lowbit {
namespace {

constexpr int64_t kFold = 2048;  // chunks between folds of the high-nibble sums (see above)

// One chunk of the block's four columns at p into (lo, hi), x[0..16) and x[16..32) broadcast in xl, xh.
inline void Chunk(const uint8_t* p, __m512i xl, __m512i xh, __m512i mask, __m512i& lo, __m512i& hi) {
  const __m512i v = _mm512_loadu_si512(p);
  lo = _mm512_dpbusd_epi32(lo, _mm512_and_si512(v, mask), xl);
  hi = _mm512_dpbusd_epi32(hi, _mm512_andnot_si512(mask, v), xh);
}

inline __m512i Broadcast16(const int8_t* x) {
  return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}

// The integer dot products of one group: chunks [0, chunks) of the block's stream at p against xg.
inline __m512i GroupDot(const uint8_t* p, const int8_t* xg, int64_t chunks, __m512i mask) {
  constexpr int64_t kBytes = kBlock * 16;
  __m512i dot = _mm512_setzero_si512();
  for (int64_t c0 = 0; c0 < chunks; c0 += kFold) {
    const int64_t c1 = std::min(chunks, c0 + kFold);
    __m512i lo0 = _mm512_setzero_si512(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
    int64_t ch = c0;
    for (; ch + 2 <= c1; ch += 2) {
      const int8_t* x = xg + ch * kChunk;
      Chunk(p + ch * kBytes, Broadcast16(x), Broadcast16(x + 16), mask, lo0, hi0);
      Chunk(p + (ch + 1) * kBytes, Broadcast16(x + 32), Broadcast16(x + 48), mask, lo1, hi1);
    }
    if (ch < c1) Chunk(p + ch * kBytes, Broadcast16(xg + ch * kChunk), Broadcast16(xg + ch * kChunk + 16), mask, lo0, hi0);
    const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(hi0, hi1), 4);
    dot = _mm512_add_epi32(dot, _mm512_add_epi32(_mm512_add_epi32(lo0, lo1), hi));
  }
  return dot;
}

// Columns n .. n + 3 (n a multiple of 4), groups [g0, g1): as the AVX2 build's GemvI8Block.
inline void GemvI8Block(const Weights& w, const int8_t* xq, const float* sumxq, int64_t n, int64_t n1, int64_t g0,
                        int64_t g1, float* y) {
  const int64_t per_group = w.group / kChunk;
  const uint8_t* p = w.Chunk(n, g0 * per_group);
  const float* scale = w.scale.data() + w.ScaleIndex(n, 0);
  const uint8_t* zp = w.zero.data() + w.ScaleIndex(n, 0);
  if (n + kBlock < w.np) {
    // The next block's scales and zero points of this slab are short runs (16 and 4 bytes per group) a block
    // stride apart, which the hardware prefetchers do not foresee: ask for them while this block's codes stream.
    const char* ns = reinterpret_cast<const char*>(w.scale.data() + w.ScaleIndex(n + kBlock, g0));
    const char* nz = reinterpret_cast<const char*>(w.zero.data() + w.ScaleIndex(n + kBlock, g0));
    for (int64_t b = 0; b < (g1 - g0) * kBlock * 4; b += 64) _mm_prefetch(ns + b, _MM_HINT_T0);
    for (int64_t b = 0; b < (g1 - g0) * kBlock; b += 64) _mm_prefetch(nz + b, _MM_HINT_T0);
  }
  const __m512i mask = _mm512_set1_epi8(0x0f);
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 acc = _mm512_setzero_ps();
  __m128 zero = _mm_setzero_ps();
  for (int64_t g = g0; g < g1; ++g, p += per_group * kBlock * 16) {
    const __m512i dot = GroupDot(p, xq + g * w.group, per_group, mask);
    const __m128 s4 = _mm_loadu_ps(scale + g * kBlock);
    acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4)), _mm512_cvtepi32_ps(dot), acc);
    int32_t z4;
    __builtin_memcpy(&z4, zp + g * kBlock, 4);
    const __m128 sz = _mm_mul_ps(s4, _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(z4))));  // = scale_zero
    zero = _mm_fmadd_ps(sz, _mm_broadcast_ss(sumxq + g), zero);
  }
  alignas(64) float lanes[16];
  alignas(16) float z[kBlock];
  _mm512_store_ps(lanes, acc);
  _mm_store_ps(z, zero);
  for (int c = 0; c < kBlock && n + c < n1; ++c) {
    const float* l = lanes + 4 * c;
    const float part = ((l[0] + l[1]) + (l[2] + l[3])) - z[c];
    y[n + c] = g0 == 0 ? part : y[n + c] + part;
  }
}

void GemvI8(const Weights& w, const int8_t* xq, const float* sumxq, int64_t n0, int64_t n1, int64_t g0, int64_t g1,
            float* y) {
  for (int64_t n = n0; n < n1; n += kBlock) GemvI8Block(w, xq, sumxq, n, n1, g0, g1, y);
}

// act_bits = 0, bits 4: columns n .. n + 3 as the AVX2 build's GemvBlock<4>, 16 floats per vector. A column's
// 16 code bytes are zero-extended straight from memory to 16 int32 lanes (vpmovzxbd), after which the low
// nibble is an and and the high nibble a plain shift (no mask: the bytes are already widened); each half is
// converted and FMAed against x[0..16) or x[16..32). 7 instructions per 32 weights and column against 16 for
// AVX2; the FMA chains are the eight partial sums (two per column).
inline void GemvBlock4(const Weights& w, const float* x, const float* sumx, int64_t n, int64_t n1, int64_t g0,
                       int64_t g1, float* y) {
  const int64_t per_group = w.group / kChunk;
  const uint8_t* p = w.Chunk(n, g0 * per_group);
  const float* scale = w.scale.data() + w.ScaleIndex(n, 0);
  const float* scale_zero = w.scale_zero.data() + w.ScaleIndex(n, 0);
  const __m512i mask = _mm512_set1_epi32(15);
  __m512 acc[kBlock];
  __m128 zero = _mm_setzero_ps();
  for (int c = 0; c < kBlock; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t g = g0; g < g1; ++g) {
    __m512 pa[kBlock], pb[kBlock];
    for (int c = 0; c < kBlock; ++c) pa[c] = pb[c] = _mm512_setzero_ps();
    const float* xg = x + g * w.group;
    for (int64_t ch = 0; ch < per_group; ++ch, p += kBlock * 16) {
      const __m512 x0 = _mm512_loadu_ps(xg + ch * kChunk), x1 = _mm512_loadu_ps(xg + ch * kChunk + 16);
      for (int c = 0; c < kBlock; ++c) {
        const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * c)));
        pa[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(d, mask)), x0, pa[c]);
        pb[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(d, 4)), x1, pb[c]);
      }
    }
    for (int c = 0; c < kBlock; ++c) {
      acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(scale[g * kBlock + c]), _mm512_add_ps(pa[c], pb[c]), acc[c]);
    }
    zero = _mm_fmadd_ps(_mm_loadu_ps(scale_zero + g * kBlock), _mm_broadcast_ss(sumx + g), zero);
  }
  alignas(16) float z[kBlock];
  _mm_store_ps(z, zero);
  for (int c = 0; c < kBlock && n + c < n1; ++c) {
    // Summed through memory: gcc 12's _mm512_reduce_add_ps trips -Wmaybe-uninitialized in its own header.
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, acc[c]);
    float sum = 0.0f;
    for (const float v : lanes) sum += v;
    const float part = sum - z[c];
    y[n + c] = g0 == 0 ? part : y[n + c] + part;
  }
}

void Gemv4(const Weights& w, const float* x, const float* sumx, int64_t n0, int64_t n1, int64_t g0, int64_t g1,
           float* y) {
  for (int64_t n = n0; n < n1; n += kBlock) GemvBlock4(w, x, sumx, n, n1, g0, g1, y);
}

}  // namespace

const Kernels& Avx512Kernels() {
  static const Kernels k = [] {
    Kernels a = Avx2Kernels();
    a.gemv4 = Gemv4;
    a.gemv_i8 = GemvI8;
    return a;
  }();
  return k;
}

}  // namespace lowbit
}  // namespace onnxopt

#endif  // x86
