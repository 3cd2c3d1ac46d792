// AVX2 + FMA builds of the SparseGemm / SparseConv kernels (see prune.h); compiled with -mavx2 -mfma and
// chosen at kernel creation only on CPUs that have both (HasAvx2Fma).
//
// Tile: out[0..T) = bias + sum_j v[j] x[idx[j] stride + 0..T), T = 8 V. Each nonzero is one broadcast and V
// loads + FMAs. An FMA has 4 cycles of latency and two issue per cycle, so 8 chains are needed to keep both
// units busy: consecutive nonzeros go to S = 8 / V sets of V accumulators, summed at the end.
//
// Gather: 8 nonzeros of a row per register, their x values fetched by vgatherdps (x, one input row, stays in
// L1), two registers in flight; up to four input rows share each load of weights and indices, so a small batch
// streams the weights from memory once.
#include <immintrin.h>

#include "prune.h"

namespace onnxopt {
namespace prune {

namespace {

template <typename Index>
inline const float* Row(const float* x, const Index* idx, int64_t j, int64_t stride) {
  return x + static_cast<int64_t>(idx[j]) * stride;
}

template <typename Index, int V>
void TileAvx2(const float* v, const Index* idx, int64_t count, int64_t stride, float bias, const float* x,
              float* out) {
  constexpr int S = V >= 4 ? 2 : 8 / V;
  __m256 acc[S][V];
  for (int s = 0; s < S; ++s) {
    for (int i = 0; i < V; ++i) acc[s][i] = _mm256_setzero_ps();
  }
  int64_t j = 0;
  for (; j + S <= count; j += S) {
    for (int s = 0; s < S; ++s) {
      const float* xr = Row(x, idx, j + s, stride);
      const __m256 w = _mm256_broadcast_ss(v + j + s);
      for (int i = 0; i < V; ++i) acc[s][i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * i), acc[s][i]);
    }
  }
  for (; j < count; ++j) {
    const float* xr = Row(x, idx, j, stride);
    const __m256 w = _mm256_broadcast_ss(v + j);
    for (int i = 0; i < V; ++i) acc[0][i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * i), acc[0][i]);
  }
  const __m256 b = _mm256_set1_ps(bias);
  for (int i = 0; i < V; ++i) {
    __m256 sum = acc[0][i];
    for (int s = 1; s < S; ++s) sum = _mm256_add_ps(sum, acc[s][i]);
    _mm256_storeu_ps(out + 8 * i, _mm256_add_ps(sum, b));
  }
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
      {TileAvx2<uint16_t, 1>, TileAvx2<uint16_t, 2>, TileAvx2<uint16_t, 4>},
      {TileAvx2<int32_t, 1>, TileAvx2<int32_t, 2>, TileAvx2<int32_t, 4>},
      GatherAvx2<uint16_t>,
      GatherAvx2<int32_t>,
  };
  return k;
}

}  // namespace prune
}  // namespace onnxopt
