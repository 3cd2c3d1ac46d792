// The float (act_bits = 0) batched LowBitMatMul loops (lowbit_gemm.h), written once with 256-bit intrinsics and
// compiled twice: lowbit_gemm_avx2.cc (16 vector registers: up to 3 row vectors x 4 columns of accumulators) and
// lowbit_gemm_avx512.cc (AVX-512VL gives 32: up to 6). Included inside namespace LOWBIT_GEMM_IMPL of each, with
// kMaxVecs defined. Rows sit in the lanes (8 per vector), so a weight is one broadcast shared by every row
// vector, and no horizontal sum is needed.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "lowbit_decode.h"
#include "lowbit_gemm.h"

namespace onnxopt {
namespace lowbit {
namespace LOWBIT_GEMM_IMPL {

constexpr int64_t kLanes = 8;  // rows per vector of xt

// Columns n .. n + 3 (a packed block) over chunks [ch0, ch1) dequantized into tile[c * ldt + k - ch0 * 32]:
// W = scale q - scale_zero. The block's chunks are contiguous within a K slab; the pointer is recomputed only
// where a slab begins.
template <int kBits>
void DequantBlock(const Weights& w, int64_t n, int64_t ch0, int64_t ch1, float* tile, int64_t ldt) {
  const int64_t per_group = w.group / kChunk, bytes = w.ChunkBytes();
  const uint8_t* p = w.Chunk(n, ch0);
  int64_t slab_end = (ch0 / w.slab_chunks + 1) * w.slab_chunks;
  for (int64_t ch = ch0; ch < ch1; ++ch) {
    if (ch == slab_end) {
      p = w.Chunk(n, ch);
      slab_end += w.slab_chunks;
    }
    const int64_t g = ch / per_group;
    for (int c = 0; c < kBlock; ++c, p += bytes) {
      const int64_t i = w.ScaleIndex(n + c, g);
      const __m256 s = _mm256_set1_ps(w.scale[i]), sz = _mm256_set1_ps(w.scale_zero[i]);
      __m256i q[4];
      DecodeChunk<kBits>(p, q);
      float* t = tile + c * ldt + (ch - ch0) * kChunk;
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(t + 8 * j, _mm256_fmsub_ps(s, _mm256_cvtepi32_ps(q[j]), sz));
    }
  }
}

inline void Dequant(const Weights& w, int64_t n, int64_t ch0, int64_t ch1, float* tile, int64_t ldt) {
  if (w.bits == 4) return DequantBlock<4>(w, n, ch0, ch1, tile, ldt);
  if (w.bits == 3) return DequantBlock<3>(w, n, ch0, ch1, tile, ldt);
  DequantBlock<2>(w, n, ch0, ch1, tile, ldt);
}

// acc[c][v] (+)= sum_{k < kc} xt[v * ldv + k * 8 + lane] tile[c * ldt + k] for kV row vectors and the 4
// columns of one block; acc is ybuf[c * ldo + v * 8 + lane] (first: overwritten).
template <int kV>
inline void Micro(const float* xt, int64_t ldv, const float* tile, int64_t ldt, int64_t kc, float* ybuf, int64_t ldo,
                  bool first) {
  // Zeroed here and added to ybuf after the loop, with every small loop unrolled: otherwise gcc kept the
  // accumulators on the stack and stored them on every k (3x slower).
  __m256 acc[kV][kBlock];
#pragma GCC unroll 8
  for (int v = 0; v < kV; ++v) {
#pragma GCC unroll 4
    for (int c = 0; c < kBlock; ++c) acc[v][c] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    __m256 x[kV];
#pragma GCC unroll 8
    for (int v = 0; v < kV; ++v) x[v] = _mm256_loadu_ps(xt + v * ldv + k * kLanes);
#pragma GCC unroll 4
    for (int c = 0; c < kBlock; ++c) {
      const __m256 b = _mm256_broadcast_ss(tile + c * ldt + k);
#pragma GCC unroll 8
      for (int v = 0; v < kV; ++v) acc[v][c] = _mm256_fmadd_ps(x[v], b, acc[v][c]);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < kV; ++v) {
#pragma GCC unroll 4
    for (int c = 0; c < kBlock; ++c) {
      float* o = ybuf + c * ldo + v * kLanes;
      _mm256_storeu_ps(o, first ? acc[v][c] : _mm256_add_ps(acc[v][c], _mm256_loadu_ps(o)));
    }
  }
}

template <int kV>
inline void MicroRows(const float* xt, int64_t ldv, int64_t vecs, const float* tile, int64_t ldt, int64_t kc,
                      float* ybuf, int64_t ldo, bool first) {
  int64_t v = 0;
  for (; v + kV <= vecs; v += kV) Micro<kV>(xt + v * ldv, ldv, tile, ldt, kc, ybuf + v * kLanes, ldo, first);
  if constexpr (kV > 1) {
    if (v < vecs) MicroRows<kV - 1>(xt + v * ldv, ldv, vecs - v, tile, ldt, kc, ybuf + v * kLanes, ldo, first);
  }
}

// Columns [n0, n1) (at most kGemmCols, n0 a multiple of 4) of y = x W + b, in passes of up to kPassVecs row
// vectors: per K block of kGemmK, the task's blocks are dequantized into a tile [kGemmCols][kGemmK] (16 KiB,
// stays in L1 while the pass's row vectors go over it), the products accumulate in ybuf [kGemmCols][pass rows]
// (y transposed), and y is written once per pass. (A pass bounds the inputs one K block reads, 128 KiB, to L2.)
constexpr int64_t kPassVecs = 32;

inline void GemmF32(const Weights& w, const float* xt, int64_t rows, const float* b, int64_t n0, int64_t n1, float* y,
                    int64_t ldy) {
  const int64_t vecs = (rows + kLanes - 1) / kLanes, ldv = w.kp * kLanes;
  const int64_t blocks = (n1 - n0 + kBlock - 1) / kBlock;
  thread_local std::vector<float> tile, ybuf;
  tile.resize(static_cast<size_t>(kGemmCols * kGemmK));
  ybuf.resize(static_cast<size_t>(kGemmCols * kPassVecs * kLanes));
  for (int64_t v0 = 0; v0 < vecs; v0 += kPassVecs) {
    const int64_t nv = std::min(kPassVecs, vecs - v0), ldo = nv * kLanes;
    const float* xp = xt + v0 * ldv;
    for (int64_t k0 = 0; k0 < w.kp; k0 += kGemmK) {
      const int64_t kc = std::min(kGemmK, w.kp - k0);
      for (int64_t i = 0; i < blocks; ++i) {
        Dequant(w, n0 + i * kBlock, k0 / kChunk, (k0 + kc) / kChunk, tile.data() + i * kBlock * kGemmK, kGemmK);
      }
      for (int64_t i = 0; i < blocks; ++i) {
        MicroRows<kMaxVecs>(xp + k0 * kLanes, ldv, nv, tile.data() + i * kBlock * kGemmK, kGemmK, kc,
                            ybuf.data() + i * kBlock * ldo, ldo, k0 == 0);
      }
    }
    const int64_t r0 = v0 * kLanes, r1 = std::min(rows, r0 + ldo);
    for (int64_t n = n0; n < n1; ++n) {
      const float* col = ybuf.data() + (n - n0) * ldo - r0;
      const float bias = b ? b[n] : 0.0f;
      for (int64_t r = r0; r < r1; ++r) y[r * ldy + n] = col[r] + bias;
    }
  }
}

}  // namespace LOWBIT_GEMM_IMPL
}  // namespace lowbit
}  // namespace onnxopt
