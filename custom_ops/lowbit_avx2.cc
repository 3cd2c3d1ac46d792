// AVX2 + FMA builds of the LowBitMatMul loops (see lowbit.h); compiled with -mavx2 -mfma and chosen at kernel
// creation only where the CPU has both (HasAvx2Fma).
//
// Batch 1: four columns at a time share each load of x (which stays in L1). A chunk of 32 codes is one load
// (16 bytes at 4 bits, split into nibbles by and/shift; 8 bytes at 2 and 3 bits, split into bit pairs, with the
// third bit taken from a 32-bit word by per-lane shifts), widened to int32, converted to float and FMAed
// against x in two accumulators per column (8 independent FMA chains hide the FMA latency). At the end of a
// group the partial sums are scaled once (acc += scale * partial); one horizontal sum per column remains.
#include <immintrin.h>

#define LOWBIT_IMPL avx2
#include "lowbit_impl.h"
#include "lowbit_decode.h"

namespace onnxopt {
namespace lowbit {

namespace {

inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[n + c] (= if g0 == 0, else +=) the sum of acc[c] minus lane c of `zero`, for the columns < n1.
inline void Store(const __m256 (&acc)[kBlock], __m128 zero, int64_t n, int64_t n1, int64_t g0, float* y) {
  alignas(16) float z[kBlock];
  _mm_store_ps(z, zero);
  for (int c = 0; c < kBlock && n + c < n1; ++c) {
    const float part = HSum(acc[c]) - z[c];
    y[n + c] = g0 == 0 ? part : y[n + c] + part;
  }
}

// The 32 codes of one chunk as floats, q[i] = codes 8 i .. 8 i + 7.
template <int kBits>
inline void Decode(const uint8_t* p, __m256 (&q)[4]) {
  __m256i c[4];
  DecodeChunk<kBits>(p, c);
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtepi32_ps(c[i]);
}

// Partial sums of one chunk of a column: pa += q[0..16) x[0..16), pb += q[16..32) x[16..32).
template <int kBits>
inline void Chunk(const uint8_t* p, const __m256 (&x)[4], __m256& pa, __m256& pb) {
  __m256 q[4];
  Decode<kBits>(p, q);
  pa = _mm256_fmadd_ps(q[0], x[0], pa);
  pb = _mm256_fmadd_ps(q[2], x[2], pb);
  pa = _mm256_fmadd_ps(q[1], x[1], pa);
  pb = _mm256_fmadd_ps(q[3], x[3], pb);
}

// Columns n .. n + 3 (n a multiple of 4; the packed codes and scales are padded to 4 columns): one
// sequential stream of interleaved chunks. Per group, the partial sums are scaled once; the zero term,
// sum_g scale_zero sumx, is one contiguous dot product per column at the end. Only columns < n1 are written.
template <int kBits>
inline void GemvBlock(const Weights& w, const float* x, const float* sumx, int64_t n, int64_t n1, int64_t g0,
                      int64_t g1, float* y) {
  constexpr int64_t kBytes = 4 * kBits;
  const int64_t per_group = w.group / kChunk;
  const uint8_t* p = w.Chunk(n, g0 * per_group);
  const float* scale = w.scale.data() + w.ScaleIndex(n, 0);
  const float* scale_zero = w.scale_zero.data() + w.ScaleIndex(n, 0);
  __m256 acc[kBlock];
  __m128 zero = _mm_setzero_ps();  // the four columns' zero terms
  for (int c = 0; c < kBlock; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t g = g0; g < g1; ++g) {
    __m256 pa[kBlock], pb[kBlock];
    for (int c = 0; c < kBlock; ++c) pa[c] = pb[c] = _mm256_setzero_ps();
    const float* xg = x + g * w.group;
    for (int64_t ch = 0; ch < per_group; ++ch) {
      const float* xc = xg + ch * kChunk;
      const __m256 xv[4] = {_mm256_loadu_ps(xc), _mm256_loadu_ps(xc + 8), _mm256_loadu_ps(xc + 16),
                            _mm256_loadu_ps(xc + 24)};
      for (int c = 0; c < kBlock; ++c, p += kBytes) Chunk<kBits>(p, xv, pa[c], pb[c]);
    }
    for (int c = 0; c < kBlock; ++c) {
      acc[c] = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + g * kBlock + c), _mm256_add_ps(pa[c], pb[c]), acc[c]);
    }
    zero = _mm_fmadd_ps(_mm_loadu_ps(scale_zero + g * kBlock), _mm_broadcast_ss(sumx + g), zero);
  }
  Store(acc, zero, n, n1, g0, y);
}

// act_bits = 8, bits 4: columns n .. n + 3 as GemvBlock, with integer products. A chunk's 16 bytes are
// broadcast to both 128-bit lanes and the upper lane shifted right by 4 (per 32-bit word; the mask then keeps
// each byte's own nibble), which puts codes 0..31 in order against 32 int8 inputs; vpmaddubsw multiplies the
// unsigned codes by the signed inputs into 16-bit pair sums (at most 2 * 15 * 127 = 3810, so up to 8 chunks add
// in 16 bits without overflow), and one vpmaddwd per group widens to 32 bits. Five instructions per 32 weights
// and column against about fifteen for the float path.
inline void GemvI8Block(const Weights& w, const int8_t* xq, const float* sumxq, int64_t n, int64_t n1, int64_t g0,
                        int64_t g1, float* y) {
  const int64_t per_group = w.group / kChunk;
  const uint8_t* p = w.Chunk(n, g0 * per_group);
  const __m256i shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4), mask = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  const float* scale = w.scale.data() + w.ScaleIndex(n, 0);
  const float* scale_zero = w.scale_zero.data() + w.ScaleIndex(n, 0);
  __m256 acc[kBlock];
  __m128 zero = _mm_setzero_ps();
  for (int c = 0; c < kBlock; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t g = g0; g < g1; ++g) {
    __m256i dot[kBlock];
    for (int c = 0; c < kBlock; ++c) dot[c] = _mm256_setzero_si256();
    const int8_t* xg = xq + g * w.group;
    for (int64_t ch0 = 0; ch0 < per_group; ch0 += 8) {
      __m256i s16[kBlock];
      for (int c = 0; c < kBlock; ++c) s16[c] = _mm256_setzero_si256();
      const int64_t ch1 = std::min(per_group, ch0 + 8);
      for (int64_t ch = ch0; ch < ch1; ++ch) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + ch * kChunk));
        for (int c = 0; c < kBlock; ++c, p += 16) {
          const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
          const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(v, shift), mask);
          s16[c] = _mm256_add_epi16(s16[c], _mm256_maddubs_epi16(codes, xv));
        }
      }
      for (int c = 0; c < kBlock; ++c) dot[c] = _mm256_add_epi32(dot[c], _mm256_madd_epi16(s16[c], ones));
    }
    for (int c = 0; c < kBlock; ++c) {
      acc[c] = _mm256_fmadd_ps(_mm256_broadcast_ss(scale + g * kBlock + c), _mm256_cvtepi32_ps(dot[c]), acc[c]);
    }
    zero = _mm_fmadd_ps(_mm_loadu_ps(scale_zero + g * kBlock), _mm_broadcast_ss(sumxq + g), zero);
  }
  Store(acc, zero, n, n1, g0, y);
}

void GemvI8(const Weights& w, const int8_t* xq, const float* sumxq, int64_t n0, int64_t n1, int64_t g0, int64_t g1,
            float* y) {
  for (int64_t n = n0; n < n1; n += kBlock) GemvI8Block(w, xq, sumxq, n, n1, g0, g1, y);
}

// act_bits = 8: the row's codes as the portable Quantize, 8 floats per step: the same float32 product x * inv,
// rounded to nearest even (vroundps), clamped, narrowed to int8; the group sums from the int32 codes.
bool Quantize(const Weights& w, const float* x, int8_t* xq, float* sums, float* scale) {
  const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(3.4028235e38f);
  __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= w.k; k += 8) {
    const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));  // NaN or infinity
    amax = _mm256_max_ps(amax, a);
  }
  if (_mm256_movemask_ps(bad) != 0) return false;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, amax);
  float a = 0.0f;
  for (const float v : lanes) a = std::max(a, v);
  for (; k < w.k; ++k) {
    if (!std::isfinite(x[k])) return false;
    a = std::max(a, std::fabs(x[k]));
  }
  const float inv_s = a > 0.0f ? 127.0f / a : 0.0f;
  const __m256 inv = _mm256_set1_ps(inv_s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
  const int64_t per_group = w.group / kChunk;
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256i sum = _mm256_setzero_si256();
    for (int64_t c = 0; c < per_group; ++c) {
      const int64_t k0 = (g * per_group + c) * kChunk;
      __m256i q[4];
      for (int i = 0; i < 4; ++i) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + k0 + 8 * i), inv);
        const __m256 r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        sum = _mm256_add_epi32(sum, q[i]);
      }
      const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + k0), _mm256_permutevar8x32_epi32(b, order));
    }
    alignas(32) int32_t s[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(s), sum);
    sums[g] = static_cast<float>(((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])));
  }
  *scale = a > 0.0f ? a / 127.0f : 1.0f;
  return true;
}

// n0 is a multiple of 4 (tasks cover multiples of 4 columns).
template <int kBits>
void Gemv(const Weights& w, const float* x, const float* sumx, int64_t n0, int64_t n1, int64_t g0, int64_t g1,
          float* y) {
  for (int64_t n = n0; n < n1; n += kBlock) GemvBlock<kBits>(w, x, sumx, n, n1, g0, g1, y);
}

template <int kBits>
void DequantBits(const Weights& w, int64_t n0, int64_t cols, float* tile) {
  const int64_t chunks = w.kp / kChunk, per_group = w.group / kChunk;
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t n = n0 + c;
    float* t = tile + c * w.kp;
    for (int64_t ch = 0; ch < chunks; ++ch, t += kChunk) {
      const int64_t i = w.ScaleIndex(n, ch / per_group);
      const __m256 s = _mm256_set1_ps(w.scale[i]), sz = _mm256_set1_ps(w.scale_zero[i]);
      __m256 q[4];
      Decode<kBits>(w.Chunk(n, ch), q);
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(t + 8 * j, _mm256_fmsub_ps(s, q[j], sz));
    }
  }
}

void Dequant(const Weights& w, int64_t n0, int64_t cols, float* tile) {
  if (w.bits == 4) return DequantBits<4>(w, n0, cols, tile);
  if (w.bits == 3) return DequantBits<3>(w, n0, cols, tile);
  DequantBits<2>(w, n0, cols, tile);
}

// kR rows x kC columns of dot products over kp, kR kC accumulators (8 at 4 x 2: enough FMA chains).
template <int kR, int kC>
inline void TileBlock(const float* x, int64_t ldx, const float* tile, int64_t kp, float* y, int64_t ldy) {
  __m256 acc[kR][kC];
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < kC; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kp; k += 8) {
    __m256 t[kC];
    for (int c = 0; c < kC; ++c) t[c] = _mm256_loadu_ps(tile + c * kp + k);
    for (int r = 0; r < kR; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * ldx + k);
      for (int c = 0; c < kC; ++c) acc[r][c] = _mm256_fmadd_ps(xv, t[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kR; ++r)
    for (int c = 0; c < kC; ++c) y[r * ldy + c] = HSum(acc[r][c]);
}

template <int kR>
inline void TileRows(const float* x, int64_t ldx, const float* tile, int64_t kp, float* y, int64_t ldy,
                     int64_t cols) {
  int64_t c = 0;
  for (; c + 2 <= cols; c += 2) TileBlock<kR, 2>(x, ldx, tile + c * kp, kp, y + c, ldy);
  if (c < cols) TileBlock<kR, 1>(x, ldx, tile + c * kp, kp, y + c, ldy);
}

void Tile(const float* x, int64_t ldx, int64_t rows, const float* tile, int64_t kp, float* y, int64_t ldy,
          int64_t cols) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) TileRows<4>(x + r * ldx, ldx, tile, kp, y + r * ldy, ldy, cols);
  for (; r < rows; ++r) TileRows<1>(x + r * ldx, ldx, tile, kp, y + r * ldy, ldy, cols);
}

// LowBitConv: 4 filters x kV vectors of 8 pixels in 4 kV accumulators (12 at kV = 3, leaving registers for the
// kV pixel loads and one broadcast): per k, kV loads of the im2col row and 4 broadcasts (one from each filter's
// row of the panel) feed 4 kV FMAs. The
// last vector is masked when `rem` < 8 (the ragged end of a row of pixels, which may end a buffer).
template <int kV, bool kMasked>
inline void ConvMicro(const float* panel, int64_t ldp, const float* col, int64_t ldc, int64_t k0, int64_t k1,
                      int64_t nf, const float* init, bool first, float* y, int64_t ldy, int rem) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), lane);
  __m256 acc[4][kV];
  for (int f = 0; f < 4; ++f) {
    for (int v = 0; v < kV; ++v) {
      if (f >= nf) {
        acc[f][v] = _mm256_setzero_ps();
      } else if (first) {
        acc[f][v] = init ? _mm256_broadcast_ss(init + f) : _mm256_setzero_ps();
      } else {
        acc[f][v] = kMasked && v == kV - 1 ? _mm256_maskload_ps(y + f * ldy + 8 * v, mask)
                                           : _mm256_loadu_ps(y + f * ldy + 8 * v);
      }
    }
  }
  for (int64_t k = k0; k < k1; ++k) {
    const float* c = col + k * ldc;
    __m256 x[kV];
    for (int v = 0; v < kV; ++v) {
      x[v] = kMasked && v == kV - 1 ? _mm256_maskload_ps(c + 8 * v, mask) : _mm256_loadu_ps(c + 8 * v);
    }
    for (int f = 0; f < 4; ++f) {
      const __m256 b = _mm256_broadcast_ss(panel + f * ldp + k);
      for (int v = 0; v < kV; ++v) acc[f][v] = _mm256_fmadd_ps(b, x[v], acc[f][v]);
    }
  }
  // A constant trip count (f < 4, not f < nf) keeps the accumulators in registers: with the run-time bound
  // gcc kept them on the stack and stored all twelve on every k (4x slower).
  for (int f = 0; f < 4; ++f) {
    if (f >= nf) break;
    for (int v = 0; v < kV; ++v) {
      if (kMasked && v == kV - 1) {
        _mm256_maskstore_ps(y + f * ldy + 8 * v, mask, acc[f][v]);
      } else {
        _mm256_storeu_ps(y + f * ldy + 8 * v, acc[f][v]);
      }
    }
  }
}

void ConvTile(const float* panel, int64_t ldp, const float* col, int64_t ldc, int64_t k0, int64_t k1, int64_t p0,
              int64_t p1, int64_t filters, const float* init, bool first, float* y, int64_t ldy) {
  int64_t p = p0;
  // Filters 0-3 then 4-7 of the panel on the same pixels: the second pass finds the im2col rows in L1.
  for (; p + 24 <= p1; p += 24) {
    for (int64_t f = 0; f < filters; f += 4) {
      ConvMicro<3, false>(panel + f * ldp, ldp, col + p, ldc, k0, k1, std::min<int64_t>(4, filters - f), init ? init + f : nullptr,
                   first, y + f * ldy + p, ldy, 8);
    }
  }
  for (; p < p1; p += 8) {
    const int rem = static_cast<int>(std::min<int64_t>(8, p1 - p));
    for (int64_t f = 0; f < filters; f += 4) {
      const int64_t nf = std::min<int64_t>(4, filters - f);
      const float* in = init ? init + f : nullptr;
      if (rem == 8) {
        ConvMicro<1, false>(panel + f * ldp, ldp, col + p, ldc, k0, k1, nf, in, first, y + f * ldy + p, ldy, rem);
      } else {
        ConvMicro<1, true>(panel + f * ldp, ldp, col + p, ldc, k0, k1, nf, in, first, y + f * ldy + p, ldy, rem);
      }
    }
  }
}

void GemvAny(const Weights& w, const float* x, const float* sumx, int64_t n0, int64_t n1, int64_t g0, int64_t g1,
             float* y) {
  if (w.bits == 4) return Gemv<4>(w, x, sumx, n0, n1, g0, g1, y);
  if (w.bits == 3) return Gemv<3>(w, x, sumx, n0, n1, g0, g1, y);
  Gemv<2>(w, x, sumx, n0, n1, g0, g1, y);
}

}  // namespace

const Kernels& Avx2Kernels() {
  static const Kernels k{Gemv<4>, GemvAny, GemvI8, Quantize, Dequant, Tile, ConvTile};
  return k;
}

}  // namespace lowbit
}  // namespace onnxopt
