// DepthwiseConv's AVX2 + FMA rows (see depthwise.h). Every function carries the target attribute as well as
// the file's -mavx2 -mfma (lambdas would not inherit it); the weights are broadcast once per task, not per row.
// Used only when the CPU has AVX2 and FMA (HasAvx2Fma()); depthwise.cc holds the portable rows.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "depthwise.h"

namespace onnxopt {
namespace depthwise {
namespace {

#define ONNXOPT_AVX2 __attribute__((target("avx2,fma")))

// Lanes l of a register with begin <= l < end, as a load mask.
ONNXOPT_AVX2 inline __m256i LaneMask(int64_t begin, int64_t end) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int b = static_cast<int>(std::clamp<int64_t>(begin, -1, kLanes));
  const int e = static_cast<int>(std::clamp<int64_t>(end, -1, kLanes));
  return _mm256_and_si256(_mm256_cmpgt_epi32(lanes, _mm256_set1_epi32(b - 1)),
                          _mm256_cmpgt_epi32(_mm256_set1_epi32(e), lanes));
}

// Lane l = row[start + l] where 0 <= start + l < w, else 0, for a block that crosses a border of the row. Every
// pointer formed stays inside [row, row + w]: a block that starts left of the row is loaded from row[0] and
// its lanes moved right by -start (a lane permute), rather than read through a pointer before the row.
ONNXOPT_AVX2 inline __m256 LoadWindow(const float* row, int64_t w, int64_t start) {
  if (start >= w || start + kLanes <= 0) return _mm256_setzero_ps();
  if (start >= 0) return _mm256_maskload_ps(row + start, LaneMask(0, w - start));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int shift = static_cast<int>(-start);  // 1..7
  const __m256 v = _mm256_maskload_ps(row, LaneMask(0, w));
  const __m256 moved = _mm256_permutevar8x32_ps(v, _mm256_sub_epi32(lanes, _mm256_set1_epi32(shift)));
  return _mm256_and_ps(moved, _mm256_castsi256_ps(LaneMask(shift, kLanes)));
}

struct VecWeights {
  __m256 w[9];
  __m256 bias, lo, hi;
};

ONNXOPT_AVX2 inline VecWeights Broadcast(const float* w9, float bias, const Activation& act) {
  VecWeights v;
  for (int k = 0; k < 9; ++k) v.w[k] = _mm256_set1_ps(w9[k]);
  v.bias = _mm256_set1_ps(bias);
  v.lo = _mm256_set1_ps(act.lo);
  v.hi = _mm256_set1_ps(act.hi);
  return v;
}

// The first n (1..7) lanes of v to out, with plain 4-, 2- and 1-float stores: a masked store (vmaskmovps) is
// microcoded and slow on AMD, and on a 7- or 14-wide row every row ends in such a partial block.
ONNXOPT_AVX2 inline void StorePartial(float* out, __m256 v, int64_t n) {
  __m128 part = _mm256_castps256_ps128(v);
  if (n & 4) {
    _mm_storeu_ps(out, part);
    out += 4;
    part = _mm256_extractf128_ps(v, 1);
  }
  if (n & 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(out), part);
    out += 2;
    part = _mm_movehl_ps(part, part);
  }
  if (n & 1) _mm_store_ss(out, part);
}

// The activation, then a store of the first n (1..8) lanes.
template <bool kClamp>
ONNXOPT_AVX2 inline void Store(float* out, __m256 v, const VecWeights& vw, int64_t n) {
  // max_ps/min_ps return their second operand when one is NaN: this order lets a NaN through, like Clip.
  if (kClamp) v = _mm256_min_ps(vw.hi, _mm256_max_ps(vw.lo, v));
  if (n >= kLanes) {
    _mm256_storeu_ps(out, v);
  } else {
    StorePartial(out, v, n);
  }
}

// Stride 1, two output rows from the four input rows p[0..3]: tap j of output column x + l reads
// p[k][x + j + l - pl]. 12 loads and 18 FMAs give 16 outputs. Windowed: the block touches the left or right
// padding, so each load goes through LoadWindow (w: the rows' width); otherwise plain loads.
template <bool kWindowed>
ONNXOPT_AVX2 inline void TwoRowsS1(const float* const* p, int64_t w, int64_t start, const VecWeights& vw,
                                   __m256& top, __m256& bottom) {
  top = vw.bias;
  bottom = vw.bias;
  for (int j = 0; j < 3; ++j) {
    __m256 a0, a1, a2, a3;
    if (kWindowed) {
      a0 = LoadWindow(p[0], w, start + j);
      a1 = LoadWindow(p[1], w, start + j);
      a2 = LoadWindow(p[2], w, start + j);
      a3 = LoadWindow(p[3], w, start + j);
    } else {
      a0 = _mm256_loadu_ps(p[0] + start + j);
      a1 = _mm256_loadu_ps(p[1] + start + j);
      a2 = _mm256_loadu_ps(p[2] + start + j);
      a3 = _mm256_loadu_ps(p[3] + start + j);
    }
    top = _mm256_fmadd_ps(a0, vw.w[j], top);
    bottom = _mm256_fmadd_ps(a1, vw.w[j], bottom);
    top = _mm256_fmadd_ps(a1, vw.w[3 + j], top);
    bottom = _mm256_fmadd_ps(a2, vw.w[3 + j], bottom);
    top = _mm256_fmadd_ps(a2, vw.w[6 + j], top);
    bottom = _mm256_fmadd_ps(a3, vw.w[6 + j], bottom);
  }
}

// Stride 1, large planes: the input rows are read in place (no copy, which would cost as much memory traffic
// as the convolution): blocks of 8 columns inside the row use plain loads, the blocks at the borders
// LoadWindow, and rows outside the input point at a row of zeros (zeroed once per task).
template <bool kClamp>
ONNXOPT_AVX2 void RowsS1Avx2(const Geometry& g, const float* x, const float* w9, float bias, const Activation& act,
                             float* y, int64_t r0, int64_t r1, const float* zero) {
  const VecWeights vw = Broadcast(w9, bias, act);
  const int64_t w = g.w, pl = g.pad_left, ow = g.ow;
  for (int64_t oy = r0; oy < r1; oy += 2) {
    const bool pair = oy + 1 < r1;
    const float* p[4];
    for (int k = 0; k < 4; ++k) {
      const int64_t iy = oy - g.pad_top + k;
      p[k] = iy >= 0 && iy < g.h && (k < 3 || pair) ? x + iy * w : zero;
    }
    float* out0 = y + oy * ow;
    float* out1 = out0 + ow;
    for (int64_t c = 0; c < ow; c += kLanes) {
      __m256 top, bottom;
      if (c >= pl && c + kLanes + 2 <= w + pl) {  // every tap inside the row
        TwoRowsS1<false>(p, w, c - pl, vw, top, bottom);
      } else {
        TwoRowsS1<true>(p, w, c - pl, vw, top, bottom);
      }
      Store<kClamp>(out0 + c, top, vw, ow - c);
      if (pair) Store<kClamp>(out1 + c, bottom, vw, ow - c);
    }
  }
}

// Stride 1, small planes (see SmallPlane): the rows [r0, r1 + 2) of the zero-padded plane are copied into
// `padded` (stride g.padded_stride; its padding columns and rows are zero from the task's start and never
// written), so that every tap is a plain full-width load with no border test. The copy is one load and one
// store per 8 input floats, all in L1.
template <bool kClamp>
ONNXOPT_AVX2 void RowsS1SmallAvx2(const Geometry& g, const float* x, const float* w9, float bias,
                                  const Activation& act, float* y, int64_t r0, int64_t r1, float* padded) {
  const int64_t w = g.w, stride = g.padded_stride, ow = g.ow;
  const int64_t in0 = std::max<int64_t>(r0 - g.pad_top, 0), in1 = std::min(r1 + 2 - g.pad_top, g.h);
  const int64_t full = w / kLanes * kLanes;
  const __m256i tail_mask = LaneMask(0, w - full);
  for (int64_t iy = in0; iy < in1; ++iy) {
    const float* src = x + iy * w;
    float* dst = padded + (iy + g.pad_top) * stride + g.pad_left;
    int64_t k = 0;
    for (; k < full; k += kLanes) _mm256_storeu_ps(dst + k, _mm256_loadu_ps(src + k));
    // The lanes past the row's end load as zeros and land in the right padding, which must stay zero.
    if (k < w) _mm256_storeu_ps(dst + k, _mm256_maskload_ps(src + k, tail_mask));
  }
  const VecWeights vw = Broadcast(w9, bias, act);
  const int64_t tail = ow - (g.ow_vec - kLanes);  // valid lanes of a row's last block, 1..8
  const int64_t last = g.ow_vec - kLanes;         // column of a row's last block
  for (int64_t oy = r0; oy < r1; oy += 2) {
    const bool pair = oy + 1 < r1;
    // Padded row oy + k; a single last row reads one row past the band, which the buffer holds (as zeros or
    // as a copied row: either way its output is not stored).
    const float* p[4];
    for (int k = 0; k < 4; ++k) p[k] = padded + (oy + k) * stride;
    float* out0 = y + oy * ow;
    float* out1 = out0 + ow;
    // A row's last block is stored whole when a later store of this task rewrites the lanes past the row's
    // end (the start of the next row): the top row's before the bottom row is stored, the bottom row's unless
    // it is the band's last. Only the band's last row ends in a piecewise store: nothing past it is ours.
    __m256 bottoms[kSmallWidth / kLanes];
    for (int64_t c = 0, b = 0; c < ow; c += kLanes, ++b) {
      __m256 top;
      TwoRowsS1<false>(p, 0, c, vw, top, bottoms[b]);
      Store<kClamp>(out0 + c, top, vw, pair ? kLanes : ow - c);
    }
    if (!pair) continue;
    const bool band_end = oy + 2 >= r1;
    for (int64_t c = 0, b = 0; c < ow; c += kLanes, ++b) {
      Store<kClamp>(out1 + c, bottoms[b], vw, c == last && band_end ? tail : kLanes);
    }
  }
}

// Stride 2: input row r prepared as its padded even columns then its odd columns (half floats each).
ONNXOPT_AVX2 void PrepareRowS2Avx2(const Geometry& g, const float* x, int64_t r, float* dst) {
  const int64_t half = g.ow_vec + kLanes;
  if (r < 0 || r >= g.h) {
    std::memset(dst, 0, static_cast<size_t>(2 * half) * sizeof(float));
    return;
  }
  const float* row = x + r * g.w;  // padded column q is row[q - pad_left] where inside the input
  const int64_t pl = g.pad_left, w = g.w;
  constexpr int kOrder = _MM_SHUFFLE(3, 1, 2, 0);
  for (int64_t k = 0; k < half; k += kLanes) {
    const int64_t q = 2 * k - pl;  // input columns q .. q + 15
    __m256 a, b;
    if (q >= 0 && q + 2 * kLanes <= w) {
      a = _mm256_loadu_ps(row + q);
      b = _mm256_loadu_ps(row + q + kLanes);
    } else {
      a = LoadWindow(row, w, q);
      b = LoadWindow(row, w, q + kLanes);
    }
    // shuffle_ps picks lanes within each 128-bit half (a0 a2 b0 b2 | a4 a6 b4 b6); permute4x64 orders them.
    const __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    _mm256_storeu_ps(dst + k, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), kOrder)));
    _mm256_storeu_ps(dst + half + k, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), kOrder)));
  }
}

// Stride 2: a ring of prepared rows; tap (i, j) of output column x reads even_i[x], odd_i[x], even_i[x + 1].
template <bool kClamp>
ONNXOPT_AVX2 void RowsS2Avx2(const Geometry& g, const float* x, const float* w9, float bias, const Activation& act,
                             float* y, int64_t r0, int64_t r1, float* scratch) {
  const VecWeights vw = Broadcast(w9, bias, act);
  const int64_t half = g.ow_vec + kLanes, first_input_row = 2 * r0 - g.pad_top;
  int64_t prepared = 0;
  for (int64_t oy = r0; oy < r1; ++oy) {
    const int64_t top = 2 * (oy - r0);
    for (; prepared <= top + 2; ++prepared) {
      PrepareRowS2Avx2(g, x, first_input_row + prepared, scratch + (prepared % kRingRows) * g.row_floats);
    }
    const float* e[3];
    for (int i = 0; i < 3; ++i) e[i] = scratch + ((top + i) % kRingRows) * g.row_floats;
    float* out = y + oy * g.ow;
    for (int64_t c = 0; c < g.ow; c += kLanes) {
      __m256 acc = vw.bias;
      for (int i = 0; i < 3; ++i) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(e[i] + c), vw.w[3 * i], acc);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(e[i] + half + c), vw.w[3 * i + 1], acc);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(e[i] + c + 1), vw.w[3 * i + 2], acc);
      }
      Store<kClamp>(out + c, acc, vw, g.ow - c);
    }
  }
}

#undef ONNXOPT_AVX2

}  // namespace

void RowsAvx2(const Geometry& g, const float* x, const float* w9, float bias, const Activation& act, float* y,
              int64_t r0, int64_t r1, float* scratch) {
  if (g.small) {
    act.clamp ? RowsS1SmallAvx2<true>(g, x, w9, bias, act, y, r0, r1, scratch)
              : RowsS1SmallAvx2<false>(g, x, w9, bias, act, y, r0, r1, scratch);
  } else if (g.stride == 1) {
    act.clamp ? RowsS1Avx2<true>(g, x, w9, bias, act, y, r0, r1, scratch)
              : RowsS1Avx2<false>(g, x, w9, bias, act, y, r0, r1, scratch);
  } else {
    act.clamp ? RowsS2Avx2<true>(g, x, w9, bias, act, y, r0, r1, scratch)
              : RowsS2Avx2<false>(g, x, w9, bias, act, y, r0, r1, scratch);
  }
}

}  // namespace depthwise
}  // namespace onnxopt
