// AVX2 + FMA builds of the SparseGemm / SparseConv kernels (see prune.h); compiled with -mavx2 -mfma and
// chosen at kernel creation only on CPUs that have both (HasAvx2Fma).
//
// Tile: out[0..T) = (accumulate ? out[0..T) : bias) + sum_j v[j] x[idx[j] stride + 0..T), T = 8 V. Each nonzero is one broadcast and V
// loads + FMAs. An FMA has 4 cycles of latency and two issue per cycle, so about 8 chains are needed to keep
// both units busy: consecutive nonzeros go to 8 / V sets of V accumulators (T = 8: 4), summed at the end.
//
// Gather: 8 nonzeros of a row per register, their x values fetched by vgatherdps (x, one input row, stays in
// L1), two registers in flight; up to four input rows share each load of weights and indices, so a small batch
// streams the weights from memory once.
#include <immintrin.h>

#include "prune.h"

namespace onnxopt {
namespace prune {

namespace {

// The input row of nonzero j: x + idx[j] * kStride (kStride = T for a transposed Gemm tile, 1 for an offset).
template <int kStride, typename Index>
inline const float* Row(const float* x, const Index* idx, int64_t j) {
  return x + static_cast<int64_t>(idx[j]) * kStride;
}

inline __m256 Fma(const float* w, const float* x, __m256 acc) {
  return _mm256_fmadd_ps(_mm256_broadcast_ss(w), _mm256_loadu_ps(x), acc);
}

// What the sums are added to: the bias, or (a later column block) the partial sums already in out.
inline __m256 Base(const float* out, float bias, bool accumulate) {
  return accumulate ? _mm256_loadu_ps(out) : _mm256_set1_ps(bias);
}

// The accumulators are named variables, not an array: gcc keeps an array of __m256 in memory and stores it
// back on every iteration, which made the loop bound by stores (measured 4x slower).
template <typename Index, int kStride>
void Tile32(const float* v, const Index* idx, int64_t count, float bias, bool accumulate, const float* x,
            float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t j = 0;
  for (; j + 2 <= count; j += 2) {
    const float* p = Row<kStride>(x, idx, j);
    const float* q = Row<kStride>(x, idx, j + 1);
    a0 = Fma(v + j, p, a0), a1 = Fma(v + j, p + 8, a1), a2 = Fma(v + j, p + 16, a2), a3 = Fma(v + j, p + 24, a3);
    b0 = Fma(v + j + 1, q, b0), b1 = Fma(v + j + 1, q + 8, b1), b2 = Fma(v + j + 1, q + 16, b2);
    b3 = Fma(v + j + 1, q + 24, b3);
  }
  if (j < count) {
    const float* p = Row<kStride>(x, idx, j);
    a0 = Fma(v + j, p, a0), a1 = Fma(v + j, p + 8, a1), a2 = Fma(v + j, p + 16, a2), a3 = Fma(v + j, p + 24, a3);
  }
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(a0, b0), Base(out, bias, accumulate)));
  _mm256_storeu_ps(out + 8, _mm256_add_ps(_mm256_add_ps(a1, b1), Base(out + 8, bias, accumulate)));
  _mm256_storeu_ps(out + 16, _mm256_add_ps(_mm256_add_ps(a2, b2), Base(out + 16, bias, accumulate)));
  _mm256_storeu_ps(out + 24, _mm256_add_ps(_mm256_add_ps(a3, b3), Base(out + 24, bias, accumulate)));
}

template <typename Index, int kStride>
void Tile16(const float* v, const Index* idx, int64_t count, float bias, bool accumulate, const float* x,
            float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    const float* p = Row<kStride>(x, idx, j);
    const float* q = Row<kStride>(x, idx, j + 1);
    const float* r = Row<kStride>(x, idx, j + 2);
    const float* s = Row<kStride>(x, idx, j + 3);
    a0 = Fma(v + j, p, a0), a1 = Fma(v + j, p + 8, a1), b0 = Fma(v + j + 1, q, b0), b1 = Fma(v + j + 1, q + 8, b1);
    c0 = Fma(v + j + 2, r, c0), c1 = Fma(v + j + 2, r + 8, c1), d0 = Fma(v + j + 3, s, d0);
    d1 = Fma(v + j + 3, s + 8, d1);
  }
  for (; j < count; ++j) {
    const float* p = Row<kStride>(x, idx, j);
    a0 = Fma(v + j, p, a0), a1 = Fma(v + j, p + 8, a1);
  }
  const __m256 s0 = _mm256_add_ps(_mm256_add_ps(a0, b0), _mm256_add_ps(c0, d0));
  const __m256 s1 = _mm256_add_ps(_mm256_add_ps(a1, b1), _mm256_add_ps(c1, d1));
  _mm256_storeu_ps(out, _mm256_add_ps(s0, Base(out, bias, accumulate)));
  _mm256_storeu_ps(out + 8, _mm256_add_ps(s1, Base(out + 8, bias, accumulate)));
}

template <typename Index, int kStride>
void Tile8(const float* v, const Index* idx, int64_t count, float bias, bool accumulate, const float* x,
            float* out) {
  __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    a = Fma(v + j, Row<kStride>(x, idx, j), a);
    b = Fma(v + j + 1, Row<kStride>(x, idx, j + 1), b);
    c = Fma(v + j + 2, Row<kStride>(x, idx, j + 2), c);
    d = Fma(v + j + 3, Row<kStride>(x, idx, j + 3), d);
  }
  for (; j < count; ++j) a = Fma(v + j, Row<kStride>(x, idx, j), a);
  const __m256 sum = _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d));
  _mm256_storeu_ps(out, _mm256_add_ps(sum, Base(out, bias, accumulate)));
}

inline __m256i LoadIndices(const uint16_t* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i LoadIndices(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename Index, int R>
void GatherRows(const Packed<Index>& p, const float* bias, int64_t n0, int64_t n1, const float* x,
                int64_t x_stride, float* y, int64_t y_stride) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* v = p.values.data() + p.ptr[n];
    const Index* id = p.idx.data() + p.ptr[n];
    const int64_t count = p.ptr[n + 1] - p.ptr[n];  // a multiple of 8
    __m256 a[R], b[R];
    for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= count; j += 16) {
      const __m256i i0 = LoadIndices(id + j), i1 = LoadIndices(id + j + 8);
      const __m256 w0 = _mm256_loadu_ps(v + j), w1 = _mm256_loadu_ps(v + j + 8);
      for (int r = 0; r < R; ++r) {
        a[r] = _mm256_fmadd_ps(w0, _mm256_i32gather_ps(x + r * x_stride, i0, 4), a[r]);
        b[r] = _mm256_fmadd_ps(w1, _mm256_i32gather_ps(x + r * x_stride, i1, 4), b[r]);
      }
    }
    if (j < count) {
      const __m256i i0 = LoadIndices(id + j);
      const __m256 w0 = _mm256_loadu_ps(v + j);
      for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(w0, _mm256_i32gather_ps(x + r * x_stride, i0, 4), a[r]);
    }
    for (int r = 0; r < R; ++r) y[r * y_stride + n] = bias[n] + HorizontalSum(_mm256_add_ps(a[r], b[r]));
  }
}

template <typename Index>
void GatherAvx2(const Packed<Index>& p, const float* bias, int64_t n0, int64_t n1, const float* x,
                int64_t x_stride, int rows, float* y, int64_t y_stride) {
  for (int r = 0; r < rows; r += 4) {
    const float* xr = x + r * x_stride;
    float* yr = y + r * y_stride;
    switch (rows - r) {
      case 1:
        GatherRows<Index, 1>(p, bias, n0, n1, xr, x_stride, yr, y_stride);
        break;
      case 2:
        GatherRows<Index, 2>(p, bias, n0, n1, xr, x_stride, yr, y_stride);
        break;
      case 3:
        GatherRows<Index, 3>(p, bias, n0, n1, xr, x_stride, yr, y_stride);
        break;
      default:
        GatherRows<Index, 4>(p, bias, n0, n1, xr, x_stride, yr, y_stride);
        break;
    }
  }
}

}  // namespace

const Kernels& Avx2Kernels() {
  static const Kernels k = {
      {Tile8<uint16_t, 8>, Tile16<uint16_t, 16>, Tile32<uint16_t, 32>},
      {Tile8<int32_t, 8>, Tile16<int32_t, 16>, Tile32<int32_t, 32>},
      {Tile8<int32_t, 1>, Tile16<int32_t, 1>, Tile32<int32_t, 1>},
      GatherAvx2<uint16_t>,
      GatherAvx2<int32_t>,
  };
  return k;
}

}  // namespace prune
}  // namespace onnxopt
