// DepthwiseConv kernel: 3x3 depthwise convolution, stride 1 or 2, optional fused Relu/Clip (see depthwise.h for
// the semantics and the data layout of the prepared rows).
//
// Work is split into tasks of onnxruntime's ParallelFor: runs of whole (n, c) planes when there are many, and
// row bands of single planes when there are few planes for their size. A task keeps a ring of kRingRows
// prepared input rows (zero-padded; for stride 2 split into even and odd columns); each output row reads the
// last three of them through nine pointers, one per tap, so the inner loop is nine loads and nine FMAs per
// 8 outputs with no border test. The AVX2 stride-1 path skips the ring: on large planes it reads the input in
// place (windowed loads at the borders), since a copy there would cost as much memory traffic as the
// convolution itself (measured: copying 56x56 planes made them ~1.4x slower); planes up to 32 wide are copied
// whole into a zero-padded buffer in L1, because there nearly every block touches a border.
#include "depthwise.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>

#include "kernel_util.h"
#include "ops.h"

namespace onnxopt {
namespace depthwise {

void Finish(Geometry& g) {
  g.ow_vec = (g.ow + kLanes - 1) / kLanes * kLanes;
  // Stride 1: one padded row, read at x + j for x < ow_vec, j <= 2. Stride 2: even columns (read at x and x + 1)
  // then odd columns (read at x), each ow_vec + kLanes long.
  g.row_floats = g.stride == 1 ? g.ow_vec + kLanes : 2 * (g.ow_vec + kLanes);
  // The copy writes whole registers from column pad_left on; the taps read up to column ow_vec + 1.
  const int64_t copied = g.pad_left + (g.w + kLanes - 1) / kLanes * kLanes;
  g.padded_stride = (std::max(g.ow_vec + 2, copied) + kLanes - 1) / kLanes * kLanes;
  g.padded_rows = g.oh + 3;
  g.small = g.stride == 1 && g.w <= kSmallWidth && g.ow_vec <= kSmallWidth && g.padded_stride * g.padded_rows <= kSmallPlaneFloats;
}

size_t ScratchFloats(const Geometry& g) {
  const int64_t padded = g.stride == 1 ? 0 : 2 * (g.ow_vec + kLanes);  // the unsplit row, stride 2 only
  const int64_t zero_row = g.w + kLanes;  // the AVX2 stride-1 path reads padding rows from it
  const int64_t rows = kRingRows * g.row_floats + std::max(padded, zero_row);
  return static_cast<size_t>(g.small ? std::max(rows, g.padded_stride * g.padded_rows) : rows);
}

namespace {

// dst[p] = row[p - pad_left] where that is inside the row, else 0, for p in [0, len).
void PadRow(const float* row, int64_t w, int64_t pad_left, float* dst, int64_t len) {
  const int64_t lo = std::min(pad_left, len);
  const int64_t count = std::clamp<int64_t>(len - pad_left, 0, w);
  std::memset(dst, 0, static_cast<size_t>(lo) * sizeof(float));
  if (count > 0) std::memcpy(dst + lo, row, static_cast<size_t>(count) * sizeof(float));
  std::memset(dst + lo + count, 0, static_cast<size_t>(len - lo - count) * sizeof(float));
}

// even[k] = src[2k], odd[k] = src[2k + 1] for k < half.
void SplitPortable(const float* __restrict src, float* __restrict even, float* __restrict odd, int64_t half) {
  for (int64_t k = 0; k < half; ++k) {
    even[k] = src[2 * k];
    odd[k] = src[2 * k + 1];
  }
}

// Input row r of the plane, prepared into dst (row_floats); `padded` is scratch for the unsplit stride-2 row.
void PrepareRow(const Geometry& g, const float* x, int64_t r, float* dst, float* padded) {
  if (r < 0 || r >= g.h) {  // a padding row
    std::memset(dst, 0, static_cast<size_t>(g.row_floats) * sizeof(float));
    return;
  }
  const float* row = x + r * g.w;
  if (g.stride == 1) {
    PadRow(row, g.w, g.pad_left, dst, g.row_floats);
    return;
  }
  const int64_t half = g.ow_vec + kLanes;
  PadRow(row, g.w, g.pad_left, padded, 2 * half);
  SplitPortable(padded, dst, dst + half, half);
}

// One output row: out[x] = act(bias + sum_k w9[k] a[k][x]) for x < ow; a[k] readable up to ow_vec.
template <bool kClamp>
void RowPortable(const float* const* a, const float* w9, float bias, const Activation& act, float* __restrict out,
                 int64_t ow) {
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5], *a6 = a[6], *a7 = a[7],
              *a8 = a[8];
  const float w0 = w9[0], w1 = w9[1], w2 = w9[2], w3 = w9[3], w4 = w9[4], w5 = w9[5], w6 = w9[6], w7 = w9[7],
              w8 = w9[8];
  for (int64_t x = 0; x < ow; ++x) {
    float v = bias + a0[x] * w0 + a1[x] * w1 + a2[x] * w2;
    v += a3[x] * w3 + a4[x] * w4 + a5[x] * w5;
    v += a6[x] * w6 + a7[x] * w7 + a8[x] * w8;
    if (kClamp) v = std::min(std::max(v, act.lo), act.hi);
    out[x] = v;
  }
}

void Row(const float* const* a, const float* w9, float bias, const Activation& act, float* out, int64_t ow) {
  act.clamp ? RowPortable<true>(a, w9, bias, act, out, ow) : RowPortable<false>(a, w9, bias, act, out, ow);
}

// The portable path: the ring of prepared rows for both strides, the row loop left to the compiler.
void RowsPortable(const Geometry& g, const float* x, const float* w9, float bias, const Activation& act, float* y,
                  int64_t r0, int64_t r1, float* scratch) {
  const int64_t s = g.stride;
  const int64_t first_input_row = r0 * s - g.pad_top;  // the input row of prepared row 0
  const int64_t half = g.ow_vec + kLanes;              // stride 2: offset of the odd columns in a row
  float* ring = scratch;
  float* padded = scratch + kRingRows * g.row_floats;
  int64_t prepared = 0;
  for (int64_t oy = r0; oy < r1; ++oy) {
    const int64_t top = (oy - r0) * s;  // prepared row of filter row 0
    for (; prepared <= top + 2; ++prepared) {
      PrepareRow(g, x, first_input_row + prepared, ring + (prepared % kRingRows) * g.row_floats, padded);
    }
    const float* a[9];
    for (int i = 0; i < 3; ++i) {
      const float* row = ring + ((top + i) % kRingRows) * g.row_floats;
      if (s == 1) {  // tap j reads column x + j
        a[3 * i] = row, a[3 * i + 1] = row + 1, a[3 * i + 2] = row + 2;
      } else {  // tap j reads padded column 2x + j: even[x], odd[x], even[x + 1]
        a[3 * i] = row, a[3 * i + 1] = row + half, a[3 * i + 2] = row + 1;
      }
    }
    Row(a, w9, bias, act, y + oy * g.ow, g.ow);
  }
}

// ---- AVX2 + FMA path. Every function that uses AVX2 intrinsics carries the target attribute (lambdas would
// not inherit it); the weights are broadcast once per task, not per row.

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

void ComputeRows(const Geometry& g, const float* x, const float* w9, float bias, const Activation& act, float* y,
                 int64_t r0, int64_t r1, float* scratch, bool avx2) {
  if (!avx2) {
    RowsPortable(g, x, w9, bias, act, y, r0, r1, scratch);
  } else if (g.small) {
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

namespace {

using Ort::Custom::Tensor;

// Below this many outputs a task is not worth a split (a few microseconds of work).
constexpr int64_t kMinTaskOutputs = 8192;
constexpr int64_t kMaxTasks = 256;

struct ParallelTask {
  const depthwise::Geometry* g;
  const float* x;
  const float* w;     // [C, 9]
  const float* bias;  // [C]
  const depthwise::Activation* act;
  float* y;
  bool avx2;
  int64_t tasks;
  int64_t parts;  // > 1: each task is one row band of one plane; 1: each task is a run of whole planes
  std::atomic<bool> failed{false};
};

void RunPlanes(const ParallelTask& t, int64_t p0, int64_t p1, int64_t r0, int64_t r1, float* scratch) {
  const depthwise::Geometry& g = *t.g;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c = p % g.c;
    depthwise::ComputeRows(g, t.x + p * g.h * g.w, t.w + c * 9, t.bias[c], *t.act, t.y + p * g.oh * g.ow, r0, r1,
                           scratch, t.avx2);
  }
}

void RunTask(void* data, size_t index) {
  auto* t = static_cast<ParallelTask*>(data);
  // Nothing may escape into onnxruntime's thread pool: an allocation failure is reported after the loop.
  try {
    const depthwise::Geometry& g = *t->g;
    const int64_t i = static_cast<int64_t>(index);
    // Zeroed once: the padding it holds for the stride-1 paths is never written afterwards.
    std::unique_ptr<float[]> scratch(new float[depthwise::ScratchFloats(g)]());
    if (t->parts > 1) {
      const int64_t p = i / t->parts, part = i % t->parts;
      RunPlanes(*t, p, p + 1, part * g.oh / t->parts, (part + 1) * g.oh / t->parts, scratch.get());
    } else {
      const int64_t planes = g.n * g.c;
      RunPlanes(*t, i * planes / t->tasks, (i + 1) * planes / t->tasks, 0, g.oh, scratch.get());
    }
  } catch (...) {
    t->failed.store(true);
  }
}

// Whether the node has attribute `name` as an int, float or list (for telling "absent" from "wrong type").
bool HasNonStringAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name) {
  auto ok = [api](OrtStatus* st) {
    if (st == nullptr) return true;
    api->ReleaseStatus(st);
    return false;
  };
  int64_t i = 0;
  float f = 0;
  size_t n = 0;
  return ok(api->KernelInfoGetAttribute_int64(info, name, &i)) ||
         ok(api->KernelInfoGetAttribute_float(info, name, &f)) ||
         ok(api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &n)) ||
         ok(api->KernelInfoGetAttributeArray_float(info, name, nullptr, &n));
}

std::optional<std::string> StringAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name,
                                           const std::string& where) {
  size_t size = 0;
  if (OrtStatus* st = api->KernelInfoGetAttribute_string(info, name, nullptr, &size)) {
    api->ReleaseStatus(st);
    if (HasNonStringAttribute(api, info, name)) Fail(where, std::string("attribute '") + name + "' must be a string");
    return std::nullopt;
  }
  std::string value(size, '\0');
  Ort::ThrowOnError(api->KernelInfoGetAttribute_string(info, name, value.data(), &size));
  value.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  return value;
}

std::optional<float> FloatAttribute(const OrtApi* api, const OrtKernelInfo* info, const char* name,
                                    const std::string& where) {
  float value = 0;
  if (OrtStatus* st = api->KernelInfoGetAttribute_float(info, name, &value)) {
    api->ReleaseStatus(st);
    int64_t i = 0;
    if (OrtStatus* ist = api->KernelInfoGetAttribute_int64(info, name, &i)) {
      api->ReleaseStatus(ist);
      return std::nullopt;
    }
    Fail(where, std::string("attribute '") + name + "' must be a float, got an int");
  }
  return value;
}

}  // namespace

DepthwiseConvKernel::DepthwiseConvKernel(const OrtApi* api, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kinfo{info};
  node_name_ = kinfo.GetNodeName();
  const std::string where = Where();

  present_inputs_ = onnxopt::PresentInputs(kinfo);
  if (present_inputs_ < 2 || present_inputs_ > 3) {
    Fail(where, "expects inputs (X, W) or (X, W, B), got " + std::to_string(present_inputs_) + " inputs");
  }
  if (kinfo.GetInputName(0).empty()) Fail(where, "input X (0) is missing");
  if (kinfo.GetInputName(1).empty()) Fail(where, "input W (1) is missing");

  // W: constant [C, 1, 3, 3], copied once.
  ConstantTensor w = ConstantFloatInput(kinfo, 1, "W", where);
  if (w.shape.size() != 4 || w.shape[0] < 1 || w.shape[1] != 1 || w.shape[2] != 3 || w.shape[3] != 3) {
    Fail(where, "W must have shape [C, 1, 3, 3] (one 3x3 filter per channel) with C >= 1, got " +
                    ShapeStr(w.shape));
  }
  c_ = w.shape[0];
  w_ = std::move(w.data);

  ReadAttributes(api, info, where);
  ReadActivation(api, info, where);

  // B: optional constant [C]; zeros otherwise, so that the inner loop has one form.
  bias_.assign(static_cast<size_t>(c_), 0.0f);
  if (present_inputs_ == 3) {
    ConstantTensor b = ConstantFloatInput(kinfo, 2, "B", where);
    if (b.shape.size() != 1 || b.shape[0] != c_) {
      Fail(where, "B must have shape [C] = [" + std::to_string(c_) + "], got " + ShapeStr(b.shape));
    }
    bias_ = std::move(b.data);
  }
  avx2_ = HasAvx2Fma();
}

void DepthwiseConvKernel::ReadAttributes(const OrtApi* api, const OrtKernelInfo* info, const std::string& where) {
  if (auto pads = IntsAttribute(api, info, "pads", where)) {
    if (pads->size() != 4) {
      Fail(where, "attribute 'pads' must have 4 values [top, left, bottom, right], got " + ShapeStr(*pads));
    }
    for (size_t i = 0; i < 4; ++i) {
      if ((*pads)[i] < 0) Fail(where, "attribute 'pads' must be non-negative, got " + ShapeStr(*pads));
      pads_[i] = (*pads)[i];
    }
  }
  if (auto strides = IntsAttribute(api, info, "strides", where)) {
    const std::vector<int64_t>& s = *strides;
    if (s.size() != 2 || s[0] != s[1] || (s[0] != 1 && s[0] != 2)) {
      Fail(where, "attribute 'strides' must be [1, 1] or [2, 2], got " + ShapeStr(s));
    }
    stride_ = s[0];
  }
  RequireAllOnes(api, info, "dilations", where);
  if (auto ks = IntsAttribute(api, info, "kernel_shape", where)) {
    if (*ks != std::vector<int64_t>{3, 3}) Fail(where, "kernel_shape must be [3, 3], got " + ShapeStr(*ks));
  }
  if (auto group = IntAttribute(api, info, "group", where)) {
    if (*group != c_) {
      Fail(where, "group must equal the channel count C = " + std::to_string(c_) + " (depthwise), got " +
                      std::to_string(*group));
    }
  }
}

void DepthwiseConvKernel::ReadActivation(const OrtApi* api, const OrtKernelInfo* info, const std::string& where) {
  const std::string activation = StringAttribute(api, info, "activation", where).value_or("");
  const std::optional<float> lo = FloatAttribute(api, info, "clip_min", where);
  const std::optional<float> hi = FloatAttribute(api, info, "clip_max", where);
  constexpr float kInf = std::numeric_limits<float>::infinity();
  if (activation == "clip") {
    act_ = {true, lo.value_or(-kInf), hi.value_or(kInf)};
  } else if (activation == "relu" || activation.empty()) {
    if (lo || hi) Fail(where, "attributes clip_min / clip_max need activation = \"clip\"");
    act_ = {activation == "relu", 0.0f, kInf};
  } else {
    Fail(where, "attribute 'activation' must be \"\", \"relu\" or \"clip\", got \"" + activation + "\"");
  }
}

std::string DepthwiseConvKernel::Where() const { return onnxopt::Where("DepthwiseConv", node_name_); }

Ort::Status DepthwiseConvKernel::Compute(OrtKernelContext* context, const Tensor<float>& X, const Tensor<float>& W,
                                         std::optional<const Tensor<float>*> B, Tensor<float>& Y) {
  return Guarded(Where(), [&] { Run(context, X, W, B, Y); });
}

void DepthwiseConvKernel::Run(OrtKernelContext* context, const Tensor<float>& X, const Tensor<float>& W,
                              std::optional<const Tensor<float>*> B, Tensor<float>& Y) const {
  const std::string where = Where();
  const std::vector<int64_t>& xs = X.Shape();
  if (xs.size() != 4) Fail(where, "X must have rank 4 [N, C, H, W], got shape " + ShapeStr(xs));
  if (xs[1] != c_) {
    Fail(where, "X has " + std::to_string(xs[1]) + " channels (shape " + ShapeStr(xs) + ") but W has C = " +
                    std::to_string(c_) + " filters (W shape " + ShapeStr({c_, 1, 3, 3}) + ")");
  }
  if (W.Shape() != std::vector<int64_t>{c_, 1, 3, 3}) {
    Fail(where, "W has shape " + ShapeStr(W.Shape()) + " at run time, but " + ShapeStr({c_, 1, 3, 3}) +
                    " at kernel creation");
  }
  if (B.has_value() && *B != nullptr && (*B)->Shape() != std::vector<int64_t>{c_}) {
    Fail(where, "B must have shape [" + std::to_string(c_) + "], got " + ShapeStr((*B)->Shape()));
  }

  depthwise::Geometry g;
  g.n = xs[0];
  g.c = xs[1];
  g.h = xs[2];
  g.w = xs[3];
  g.pad_top = pads_[0];
  g.pad_left = pads_[1];
  g.stride = stride_;
  if (g.n < 0 || g.h < 0 || g.w < 0) Fail(where, "X has a negative dimension: " + ShapeStr(xs));
  const int64_t span_h = g.h + pads_[0] + pads_[2] - 3, span_w = g.w + pads_[1] + pads_[3] - 3;
  g.oh = span_h < 0 ? 0 : span_h / stride_ + 1;
  g.ow = span_w < 0 ? 0 : span_w / stride_ + 1;
  if (g.oh <= 0 || g.ow <= 0) {
    Fail(where, "output would be empty: X spatial " + std::to_string(g.h) + "x" + std::to_string(g.w) +
                    " with pads " + ShapeStr({pads_[0], pads_[1], pads_[2], pads_[3]}) + " is smaller than the " +
                    "3x3 filter");
  }
  depthwise::Finish(g);

  float* y = Y.Allocate({g.n, g.c, g.oh, g.ow});
  const int64_t planes = g.n * g.c;
  if (planes == 0) return;
  if (y == nullptr) Fail(where, "could not allocate the output", ORT_FAIL);

  ParallelTask task;
  task.g = &g;
  task.x = X.Data();
  task.w = w_.data();
  task.bias = bias_.data();
  task.act = &act_;
  task.y = y;
  task.avx2 = avx2_;
  const int64_t wanted = std::clamp<int64_t>(planes * g.oh * g.ow / kMinTaskOutputs, 1, kMaxTasks);
  task.parts = planes >= wanted ? 1 : std::min(g.oh, (wanted + planes - 1) / planes);
  task.tasks = task.parts > 1 ? planes * task.parts : std::min(planes, wanted);
  if (task.tasks == 1) {
    RunTask(&task, 0);
  } else {
    Ort::KernelContext ctx{context};
    ctx.ParallelFor(RunTask, static_cast<size_t>(task.tasks), 0, &task);
  }
  if (task.failed.load()) Fail(where, "out of memory for the row buffers of a task", ORT_FAIL);
}

Ort::Custom::OrtLiteCustomOp* MakeDepthwiseConvOp() { return new SafeOp<DepthwiseConvKernel>("DepthwiseConv"); }

}  // namespace onnxopt
