// AVX2 + FMA builds of the blocked kernels (prune_block.h); compiled with -mavx2 -mfma, chosen only on CPUs
// with both.
//
// Gather (1 to 4 batch rows), no vgatherdps at all:
//   8 x 1: one broadcast of x[c] times the block's 8 weights (one vector) per batch row.
//   4 x 1: two blocks per register: [x[c0] x4 | x[c1] x4] (two broadcasts) times blocks c0, c1's weights,
//          the halves summed at the end.
//   1 x 4: two blocks per register: [x[c0 .. c0 + 4) | x[c1 .. c1 + 4)] (two 16-byte loads), summed across
//          the register at the end.
// Segments hold an even number of blocks (pad 2), consumed in pairs by two accumulators per batch row.
// Tile (R x 1 blocks, T positions): per block one load of the T inputs serves R outputs: R = 4, T = 16 and
// R = 8, T = 8 keep 8 accumulators (the FMA latency of 4 cycles times the 2 FMA units) and issue 8 FMAs per
// 2 loads + R broadcasts (CSR's tile: per 4 FMAs 4 loads, a broadcast and an index).
#include <immintrin.h>

#include "prune_block.h"

namespace onnxopt {
namespace prune {

namespace {

inline __m256 Bcast(const float* p) { return _mm256_broadcast_ss(p); }
inline __m256 Pair4(const float* lo, const float* hi) {  // [*lo x4 | *hi x4]
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(lo)), _mm_broadcast_ss(hi), 1);
}
inline __m256 Quad2(const float* lo, const float* hi) {  // [lo[0..4) | hi[0..4)]
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(lo)), _mm_loadu_ps(hi), 1);
}
inline float HorizontalSum(__m128 s) {
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m128 Halves(__m256 v) { return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); }

// Stores `width` outputs of group g (n = g width + i, only n < n_rows).
inline void StoreGroup(const float* sums, int width, const float* bias, int64_t g, int64_t n_rows, float* y) {
  for (int i = 0; i < width && g * width + i < n_rows; ++i) y[g * width + i] = bias[g * width + i] + sums[i];
}

template <typename Index, int B>
void Gather8(const Blocked<Index>& p, const float* bias, int64_t n_rows, int64_t g0, int64_t g1, const float* x,
             int64_t xs, float* y, int64_t ys) {
  for (int64_t g = g0; g < g1; ++g) {
    const float* v = p.values.data() + p.ptr[g] * 8;
    const Index* id = p.idx.data() + p.ptr[g];
    const int64_t count = p.ptr[g + 1] - p.ptr[g];
    __m256 a[B], b[B];
    for (int r = 0; r < B; ++r) a[r] = b[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < count; j += 2) {
      const __m256 w0 = _mm256_loadu_ps(v + j * 8), w1 = _mm256_loadu_ps(v + j * 8 + 8);
      const int64_t c0 = id[j], c1 = id[j + 1];
      for (int r = 0; r < B; ++r) {
        a[r] = _mm256_fmadd_ps(w0, Bcast(x + r * xs + c0), a[r]);
        b[r] = _mm256_fmadd_ps(w1, Bcast(x + r * xs + c1), b[r]);
      }
    }
    for (int r = 0; r < B; ++r) {
      if ((g + 1) * 8 <= n_rows) {
        _mm256_storeu_ps(y + r * ys + g * 8, _mm256_add_ps(_mm256_add_ps(a[r], b[r]), _mm256_loadu_ps(bias + g * 8)));
      } else {
        alignas(32) float s[8];
        _mm256_store_ps(s, _mm256_add_ps(a[r], b[r]));
        StoreGroup(s, 8, bias, g, n_rows, y + r * ys);
      }
    }
  }
}

template <typename Index, int B>
void Gather4(const Blocked<Index>& p, const float* bias, int64_t n_rows, int64_t g0, int64_t g1, const float* x,
             int64_t xs, float* y, int64_t ys) {
  for (int64_t g = g0; g < g1; ++g) {
    const float* v = p.values.data() + p.ptr[g] * 4;
    const Index* id = p.idx.data() + p.ptr[g];
    const int64_t count = p.ptr[g + 1] - p.ptr[g];
    __m256 a[B], b[B];
    for (int r = 0; r < B; ++r) a[r] = b[r] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 4 <= count; j += 4) {
      const __m256 w0 = _mm256_loadu_ps(v + j * 4), w1 = _mm256_loadu_ps(v + j * 4 + 8);
      const int64_t c0 = id[j], c1 = id[j + 1], c2 = id[j + 2], c3 = id[j + 3];
      for (int r = 0; r < B; ++r) {
        a[r] = _mm256_fmadd_ps(w0, Pair4(x + r * xs + c0, x + r * xs + c1), a[r]);
        b[r] = _mm256_fmadd_ps(w1, Pair4(x + r * xs + c2, x + r * xs + c3), b[r]);
      }
    }
    if (j < count) {
      const __m256 w0 = _mm256_loadu_ps(v + j * 4);
      for (int r = 0; r < B; ++r) a[r] = _mm256_fmadd_ps(w0, Pair4(x + r * xs + id[j], x + r * xs + id[j + 1]), a[r]);
    }
    for (int r = 0; r < B; ++r) {
      const __m128 s = Halves(_mm256_add_ps(a[r], b[r]));
      if ((g + 1) * 4 <= n_rows) {
        _mm_storeu_ps(y + r * ys + g * 4, _mm_add_ps(s, _mm_loadu_ps(bias + g * 4)));
      } else {
        alignas(16) float t[4];
        _mm_store_ps(t, s);
        StoreGroup(t, 4, bias, g, n_rows, y + r * ys);
      }
    }
  }
}

template <typename Index, int B>
void Gather1x4(const Blocked<Index>& p, const float* bias, int64_t n_rows, int64_t g0, int64_t g1, const float* x,
               int64_t xs, float* y, int64_t ys) {
  for (int64_t g = g0; g < g1 && g < n_rows; ++g) {
    const float* v = p.values.data() + p.ptr[g] * 4;
    const Index* id = p.idx.data() + p.ptr[g];
    const int64_t count = p.ptr[g + 1] - p.ptr[g];
    __m256 a[B], b[B];
    for (int r = 0; r < B; ++r) a[r] = b[r] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 4 <= count; j += 4) {
      const __m256 w0 = _mm256_loadu_ps(v + j * 4), w1 = _mm256_loadu_ps(v + j * 4 + 8);
      const int64_t c0 = id[j], c1 = id[j + 1], c2 = id[j + 2], c3 = id[j + 3];
      for (int r = 0; r < B; ++r) {
        a[r] = _mm256_fmadd_ps(w0, Quad2(x + r * xs + c0, x + r * xs + c1), a[r]);
        b[r] = _mm256_fmadd_ps(w1, Quad2(x + r * xs + c2, x + r * xs + c3), b[r]);
      }
    }
    if (j < count) {
      const __m256 w0 = _mm256_loadu_ps(v + j * 4);
      for (int r = 0; r < B; ++r) a[r] = _mm256_fmadd_ps(w0, Quad2(x + r * xs + id[j], x + r * xs + id[j + 1]), a[r]);
    }
    for (int r = 0; r < B; ++r) y[r * ys + g] = bias[g] + HorizontalSum(Halves(_mm256_add_ps(a[r], b[r])));
  }
}

#define ONNXOPT_GATHER(NAME)                                                                                     \
  template <typename Index>                                                                                      \
  void NAME##Rows(const Blocked<Index>& p, const float* bias, int64_t n_rows, int64_t g0, int64_t g1,            \
                  const float* x, int64_t xs, int rows, float* y, int64_t ys) {                                  \
    for (int r = 0; r < rows; r += 4) {                                                                          \
      switch (rows - r) {                                                                                        \
        case 1:                                                                                                  \
          NAME<Index, 1>(p, bias, n_rows, g0, g1, x + r * xs, xs, y + r * ys, ys);                               \
          break;                                                                                                 \
        case 2:                                                                                                  \
          NAME<Index, 2>(p, bias, n_rows, g0, g1, x + r * xs, xs, y + r * ys, ys);                               \
          break;                                                                                                 \
        case 3:                                                                                                  \
          NAME<Index, 3>(p, bias, n_rows, g0, g1, x + r * xs, xs, y + r * ys, ys);                               \
          break;                                                                                                 \
        default:                                                                                                 \
          NAME<Index, 4>(p, bias, n_rows, g0, g1, x + r * xs, xs, y + r * ys, ys);                               \
          break;                                                                                                 \
      }                                                                                                          \
    }                                                                                                            \
  }
ONNXOPT_GATHER(Gather8)
ONNXOPT_GATHER(Gather4)
ONNXOPT_GATHER(Gather1x4)
#undef ONNXOPT_GATHER

inline __m256 Fma(const float* w, __m256 x, __m256 acc) { return _mm256_fmadd_ps(_mm256_broadcast_ss(w), x, acc); }
inline void Put(float* o, __m256 acc, const float* bias, bool accumulate) {
  _mm256_storeu_ps(o, _mm256_add_ps(acc, accumulate ? _mm256_loadu_ps(o) : _mm256_broadcast_ss(bias)));
}

// The accumulators are named variables (gcc keeps an array of __m256 in memory here; see prune_avx2.cc).
template <typename Index>
void TileR4T16(const float* v, const Index* idx, int64_t count, const float* bias, bool accumulate,
               const float* x, int64_t xs, int live, float* out, int64_t os) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
  for (int64_t j = 0; j < count; ++j) {
    const float* xr = x + static_cast<int64_t>(idx[j]) * xs;
    const float* w = v + j * 4;
    const __m256 x0 = _mm256_loadu_ps(xr), x1 = _mm256_loadu_ps(xr + 8);
    a0 = Fma(w, x0, a0), a1 = Fma(w, x1, a1), b0 = Fma(w + 1, x0, b0), b1 = Fma(w + 1, x1, b1);
    c0 = Fma(w + 2, x0, c0), c1 = Fma(w + 2, x1, c1), d0 = Fma(w + 3, x0, d0), d1 = Fma(w + 3, x1, d1);
  }
  const __m256 acc[4][2] = {{a0, a1}, {b0, b1}, {c0, c1}, {d0, d1}};
  for (int i = 0; i < live; ++i) {
    Put(out + i * os, acc[i][0], bias + i, accumulate);
    Put(out + i * os + 8, acc[i][1], bias + i, accumulate);
  }
}

template <typename Index>
void TileR8T8(const float* v, const Index* idx, int64_t count, const float* bias, bool accumulate,
              const float* x, int64_t xs, int live, float* out, int64_t os) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t j = 0; j < count; ++j) {
    const __m256 x0 = _mm256_loadu_ps(x + static_cast<int64_t>(idx[j]) * xs);
    const float* w = v + j * 8;
    a0 = Fma(w, x0, a0), a1 = Fma(w + 1, x0, a1), a2 = Fma(w + 2, x0, a2), a3 = Fma(w + 3, x0, a3);
    a4 = Fma(w + 4, x0, a4), a5 = Fma(w + 5, x0, a5), a6 = Fma(w + 6, x0, a6), a7 = Fma(w + 7, x0, a7);
  }
  const __m256 acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
  for (int i = 0; i < live; ++i) Put(out + i * os, acc[i], bias + i, accumulate);
}

template <typename Index>
void TileR4T8(const float* v, const Index* idx, int64_t count, const float* bias, bool accumulate,
              const float* x, int64_t xs, int live, float* out, int64_t os) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t j = 0; j < count; ++j) {
    const __m256 x0 = _mm256_loadu_ps(x + static_cast<int64_t>(idx[j]) * xs);
    const float* w = v + j * 4;
    a0 = Fma(w, x0, a0), a1 = Fma(w + 1, x0, a1), a2 = Fma(w + 2, x0, a2), a3 = Fma(w + 3, x0, a3);
  }
  const __m256 acc[4] = {a0, a1, a2, a3};
  for (int i = 0; i < live; ++i) Put(out + i * os, acc[i], bias + i, accumulate);
}

}  // namespace

const BlockKernels& Avx2BlockKernels() {
  static const BlockKernels k = {
      {Gather8Rows<uint16_t>, Gather4Rows<uint16_t>, Gather1x4Rows<uint16_t>},
      {Gather8Rows<int32_t>, Gather4Rows<int32_t>, Gather1x4Rows<int32_t>},
      {TileR8T8<uint16_t>, TileR4T16<uint16_t>},
      {TileR8T8<int32_t>, TileR4T16<int32_t>},
      TileR4T8<int32_t>,
  };
  return k;
}

}  // namespace prune
}  // namespace onnxopt
