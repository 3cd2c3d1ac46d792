// The compute of WinogradConv, written once and compiled twice: winograd_avx2.cc builds it with -mavx2 -mfma,
// winograd_portable.cc without; WINOGRAD_ISA names the namespace of each build. Only the kernel in winograd.cc
// includes neither: it picks one at kernel creation (HasAvx2Fma()).
//
// A block of output tiles is computed in three stages (see winograd.h for the math and the layouts):
//   1. input transform, 8 tiles at a time: each vector lane is one tile, so the transform is a handful of
//      vector adds and its result for 8 tiles is one contiguous 8-float row of V = [E][G][C][8];
//   2. E GEMMs R[e] = U[e] V[e] with a 6x16 register-blocked micro-kernel (12 accumulators), U packed as
//      [E][M/6][C][6] so that the 6 weights of a step are adjacent;
//   3. output transform, 8 tiles at a time again, plus bias, cropped at the edges.
// Nothing here calls into the standard library's templates: the two builds must not share any instantiated
// inline function, or the linker could hand the portable path an AVX2 copy.
#ifndef WINOGRAD_ISA
#error "define WINOGRAD_ISA before including winograd_impl.h"
#endif

#include <cstring>

#include "winograd.h"

// V8 values only pass between functions of this file's anonymous namespace, never across the library's
// interface, so the note that their ABI differs without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace onnxopt {
namespace winograd {
namespace WINOGRAD_ISA {

namespace {

typedef float V8 __attribute__((vector_size(32)));

inline V8 Load(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, V8 v) { std::memcpy(p, &v, sizeof(v)); }

inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t Max(int64_t a, int64_t b) { return a > b ? a : b; }

typedef int V8i __attribute__((vector_size(32)));

// In place: r[i][j] -> r[j][i] for an 8x8 block held in 8 vectors (unpack, 2-lane shuffle, 128-bit halves).
inline void Transpose8(V8* r) {
  const V8i lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const V8i even = {0, 1, 8, 9, 4, 5, 12, 13}, odd = {2, 3, 10, 11, 6, 7, 14, 15};
  const V8i first = {0, 1, 2, 3, 8, 9, 10, 11}, second = {4, 5, 6, 7, 12, 13, 14, 15};
  V8 t[8], u[8];
  for (int k = 0; k < 8; k += 2) {
    t[k] = __builtin_shuffle(r[k], r[k + 1], lo);
    t[k + 1] = __builtin_shuffle(r[k], r[k + 1], hi);
  }
  for (int k = 0; k < 8; k += 4) {
    u[k] = __builtin_shuffle(t[k], t[k + 2], even);
    u[k + 1] = __builtin_shuffle(t[k], t[k + 2], odd);
    u[k + 2] = __builtin_shuffle(t[k + 1], t[k + 3], even);
    u[k + 3] = __builtin_shuffle(t[k + 1], t[k + 3], odd);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = __builtin_shuffle(u[k], u[k + 4], first);
    r[k + 4] = __builtin_shuffle(u[k], u[k + 4], second);
  }
}


// 1-D transforms of one column (or row) of vectors, for each output tile edge.
template <int kTile>
struct Transform;

template <>
struct Transform<2> {
  static constexpr int kA = 4;
  // t = B^T d
  static inline void In(const V8* d, int sd, V8* t, int st) {
    const V8 d0 = d[0], d1 = d[sd], d2 = d[2 * sd], d3 = d[3 * sd];
    t[0] = d0 - d2;
    t[st] = d1 + d2;
    t[2 * st] = d2 - d1;
    t[3 * st] = d1 - d3;
  }
  // y = A^T m
  static inline void Out(const V8* m, int sm, V8* y, int sy) {
    const V8 m0 = m[0], m1 = m[sm], m2 = m[2 * sm], m3 = m[3 * sm];
    y[0] = m0 + m1 + m2;
    y[sy] = m1 - m2 - m3;
  }
};

template <>
struct Transform<4> {
  static constexpr int kA = 6;
  static inline void In(const V8* d, int sd, V8* t, int st) {
    const V8 d0 = d[0], d1 = d[sd], d2 = d[2 * sd], d3 = d[3 * sd], d4 = d[4 * sd], d5 = d[5 * sd];
    const V8 a = d4 - 4.0f * d2;  // shared by rows 1 and 2
    const V8 b = d3 - 4.0f * d1;
    const V8 c = d4 - d2;  // shared by rows 3 and 4
    const V8 e = 2.0f * (d3 - d1);
    t[0] = 4.0f * d0 - 5.0f * d2 + d4;
    t[st] = a + b;
    t[2 * st] = a - b;
    t[3 * st] = c + e;
    t[4 * st] = c - e;
    t[5 * st] = 4.0f * d1 - 5.0f * d3 + d5;
  }
  static inline void Out(const V8* m, int sm, V8* y, int sy) {
    const V8 m0 = m[0], m1 = m[sm], m2 = m[2 * sm], m3 = m[3 * sm], m4 = m[4 * sm], m5 = m[5 * sm];
    const V8 p12 = m1 + m2, n12 = m1 - m2, p34 = m3 + m4, n34 = m3 - m4;
    y[0] = m0 + p12 + p34;
    y[sy] = n12 + 2.0f * n34;
    y[2 * sy] = p12 + 4.0f * p34;
    y[3 * sy] = n12 + 8.0f * n34 + m5;
  }
};

// Where each tile of a block lies: image, top-left output coordinates; img < 0 for the lanes past the block.
struct TileCoords {
  int64_t img[kMaxBlockTiles + 8];
  int64_t oy[kMaxBlockTiles + 8];
  int64_t ox[kMaxBlockTiles + 8];
};

// d[r * kA + s] lane i = the window of lane i at (r, s), zero outside the image (the general path).
template <int kA>
void GatherWindows(const ConvGeometry& g, const float* x, const TileCoords& tc, int64_t t0, int64_t c,
                   const bool* inside, V8* d) {
  const int64_t C = g.c, H = g.h, W = g.w;
  alignas(32) float buf[kA][kA][8];
  for (int i = 0; i < 8; ++i) {
    const int64_t n = tc.img[t0 + i];
    const int64_t y0 = tc.oy[t0 + i] - g.pad_top, x0 = tc.ox[t0 + i] - g.pad_left;
    if (inside[i]) {
      const float* p = x + ((n * C + c) * H + y0) * W + x0;
      for (int r = 0; r < kA; ++r) {
        for (int s = 0; s < kA; ++s) buf[r][s][i] = p[r * W + s];
      }
      continue;
    }
    // A window at the border: zeros, then the rectangle that lies inside the image.
    for (int r = 0; r < kA; ++r) {
      for (int s = 0; s < kA; ++s) buf[r][s][i] = 0.0f;
    }
    if (n < 0) continue;
    const float* plane = x + (n * C + c) * H * W;
    const int64_t r0 = y0 < 0 ? -y0 : 0, r1 = Min(kA, H - y0);
    const int64_t s0 = x0 < 0 ? -x0 : 0, s1 = Min(kA, W - x0);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t s = s0; s < s1; ++s) buf[r][s][i] = plane[(y0 + r) * W + x0 + s];
    }
  }
  for (int k = 0; k < kA * kA; ++k) d[k] = Load(&buf[0][0][0] + k * 8);
}

// Index of the last lane of the block that holds a tile.
inline int64_t LastLane(const TileCoords& tc, int64_t groups) {
  int64_t last = groups * 8 - 1;
  while (last > 0 && tc.img[last] < 0) --last;
  return last;
}

template <int kTile>
void InputTransformDirect(const ConvGeometry& g, const float* x, const TileCoords& tc, int64_t groups, int64_t c_begin,
                    int64_t c_end, float* v) {
  constexpr int kA = Transform<kTile>::kA;
  constexpr int kE = kA * kA;
  const int64_t C = g.c, H = g.h, W = g.w;
  for (int64_t grp = 0; grp < groups; ++grp) {
    const int64_t t0 = grp * 8;
    // Lanes whose whole window is inside the image are read without bounds checks; when all 8 are, and
    // reading 8 floats from each window row stays inside X, the windows are read as rows and transposed.
    bool inside[8], rows_ok = true;
    const int64_t x_floats = g.n * C * H * W;
    for (int i = 0; i < 8; ++i) {
      const int64_t y0 = tc.oy[t0 + i] - g.pad_top, x0 = tc.ox[t0 + i] - g.pad_left;
      inside[i] = tc.img[t0 + i] >= 0 && y0 >= 0 && x0 >= 0 && y0 + kA <= H && x0 + kA <= W;
      const int64_t last = ((tc.img[t0 + i] * C + C - 1) * H + y0 + kA - 1) * W + x0 + 8;
      rows_ok = rows_ok && inside[i] && last <= x_floats;
    }
    for (int64_t c = c_begin; c < c_end; ++c) {
      V8 d[kA * kA], t[kA * kA];
      if (rows_ok) {
        const float* p[8];
        for (int i = 0; i < 8; ++i) {
          p[i] = x + ((tc.img[t0 + i] * C + c) * H + tc.oy[t0 + i] - g.pad_top) * W + tc.ox[t0 + i] - g.pad_left;
        }
        for (int r = 0; r < kA; ++r) {
          V8 rows[8];
          for (int i = 0; i < 8; ++i) rows[i] = Load(p[i] + r * W);
          Transpose8(rows);
          for (int s = 0; s < kA; ++s) d[r * kA + s] = rows[s];
        }
      } else {
        GatherWindows<kA>(g, x, tc, t0, c, inside, d);
      }
      for (int s = 0; s < kA; ++s) Transform<kTile>::In(d + s, kA, t + s, kA);  // B^T d, column by column
      for (int r = 0; r < kA; ++r) Transform<kTile>::In(t + r * kA, 1, d + r * kA, 1);  // (B^T d) B
      for (int e = 0; e < kE; ++e) Store(v + e * VStrideFloats(groups, C) + (grp * C + c) * 8, d[e]);
    }
  }
}

// Small images: their tiles are mostly at the border, so each channel plane of the block's images is first
// copied into a zero-padded buffer (with 8 floats of slack at the right for the row reads), and every group
// is then read as rows and transposed, with no bounds checks.
template <int kTile>
void InputTransformPadded(const ConvGeometry& g, const float* x, const TileCoords& tc, int64_t groups,
                          int64_t c_begin, int64_t c_end, float* v) {
  constexpr int kA = Transform<kTile>::kA;
  constexpr int kE = kA * kA;
  const int64_t C = g.c, H = g.h, W = g.w;
  const int64_t PH = g.tiles_h * kTile + 2, PW = g.tiles_w * kTile + 2 + 8;
  const int64_t n0 = tc.img[0], n1 = tc.img[Max(0, LastLane(tc, groups))] + 1;  // images of the block
  float* planes = new float[(n1 - n0) * PH * PW];
  for (int64_t c = c_begin; c < c_end; ++c) {
    for (int64_t n = n0; n < n1; ++n) {
      float* P = planes + (n - n0) * PH * PW;
      for (int64_t k = 0; k < PH * PW; ++k) P[k] = 0.0f;
      const float* plane = x + (n * C + c) * H * W;
      for (int64_t r = 0; r < H && g.pad_top + r < PH; ++r) {
        const int64_t cols = Min(W, PW - 8 - g.pad_left);
        for (int64_t s = 0; s < cols; ++s) P[(g.pad_top + r) * PW + g.pad_left + s] = plane[r * W + s];
      }
    }
    for (int64_t grp = 0; grp < groups; ++grp) {
      const float* p[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t t0 = grp * 8 + i;
        const int64_t n = tc.img[t0] >= 0 ? tc.img[t0] : n0;  // lanes past the block read anything finite
        p[i] = planes + (n - n0) * PH * PW + tc.oy[t0] * PW + tc.ox[t0];
      }
      V8 d[kA * kA], t[kA * kA];
      for (int r = 0; r < kA; ++r) {
        V8 rows[8];
        for (int i = 0; i < 8; ++i) rows[i] = Load(p[i] + r * PW);
        Transpose8(rows);
        for (int s = 0; s < kA; ++s) d[r * kA + s] = rows[s];
      }
      for (int s = 0; s < kA; ++s) Transform<kTile>::In(d + s, kA, t + s, kA);
      for (int r = 0; r < kA; ++r) Transform<kTile>::In(t + r * kA, 1, d + r * kA, 1);
      for (int e = 0; e < kE; ++e) Store(v + e * VStrideFloats(groups, C) + (grp * C + c) * 8, d[e]);
    }
  }
  delete[] planes;
}

template <int kTile>
void InputTransform(const ConvGeometry& g, const float* x, const TileCoords& tc, int64_t groups, int64_t c_begin,
                    int64_t c_end, float* v) {
  if (g.TilesPerImage() <= kMaxBlockTiles) {
    InputTransformPadded<kTile>(g, x, tc, groups, c_begin, c_end, v);
  } else {
    InputTransformDirect<kTile>(g, x, tc, groups, c_begin, c_end, v);
  }
}

// R rows [6 x 8 * kNV] += U panel [C x 6] times V groups [C x 8] (kNV of them), stored into R's layout.
template <int kNV>
inline void Micro(const float* __restrict up, const float* __restrict v0, const float* __restrict v1, int64_t k,
                  float* __restrict r, int64_t row_stride, int64_t group_stride, bool accumulate) {
  V8 a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {};
  V8 b0 = {}, b1 = {}, b2 = {}, b3 = {}, b4 = {}, b5 = {};
  if (accumulate) {  // a later slice of the channels: continue the sums of the previous ones
    a0 = Load(r + 0 * row_stride);
    a1 = Load(r + 1 * row_stride);
    a2 = Load(r + 2 * row_stride);
    a3 = Load(r + 3 * row_stride);
    a4 = Load(r + 4 * row_stride);
    a5 = Load(r + 5 * row_stride);
    if (kNV == 2) {
      b0 = Load(r + group_stride + 0 * row_stride);
      b1 = Load(r + group_stride + 1 * row_stride);
      b2 = Load(r + group_stride + 2 * row_stride);
      b3 = Load(r + group_stride + 3 * row_stride);
      b4 = Load(r + group_stride + 4 * row_stride);
      b5 = Load(r + group_stride + 5 * row_stride);
    }
  }
  // Both columns' FMAs of a row follow its broadcast at once: each broadcast then lives in one register
  // briefly, and the 12 accumulators, 2 columns and 1 broadcast fit the 16 vector registers without spills.
  for (int64_t c = 0; c < k; ++c) {
    const float* u = up + c * 6;
    // U is read once per block, from DRAM on deep layers, at about the rate one core can stream: ask for it
    // 4 KiB ahead, about one DRAM latency at the rate the FMAs consume it (768 B and 8 KiB measured slower).
    __builtin_prefetch(u + 1024);
    const V8 x0 = Load(v0 + c * 8);
    const V8 x1 = kNV == 2 ? Load(v1 + c * 8) : x0;
#define ONNXOPT_ROW(i)          \
  {                             \
    const float s = u[i];       \
    a##i += s * x0;             \
    if (kNV == 2) b##i += s * x1; \
  }
    ONNXOPT_ROW(0)
    ONNXOPT_ROW(1)
    ONNXOPT_ROW(2)
    ONNXOPT_ROW(3)
    ONNXOPT_ROW(4)
    ONNXOPT_ROW(5)
#undef ONNXOPT_ROW
  }
  Store(r + 0 * row_stride, a0);
  Store(r + 1 * row_stride, a1);
  Store(r + 2 * row_stride, a2);
  Store(r + 3 * row_stride, a3);
  Store(r + 4 * row_stride, a4);
  Store(r + 5 * row_stride, a5);
  if (kNV == 2) {
    Store(r + group_stride + 0 * row_stride, b0);
    Store(r + group_stride + 1 * row_stride, b1);
    Store(r + group_stride + 2 * row_stride, b2);
    Store(r + group_stride + 3 * row_stride, b3);
    Store(r + group_stride + 4 * row_stride, b4);
    Store(r + group_stride + 5 * row_stride, b5);
  }
}

// R[ml][grp][e][8] = sum_c U[e][m][c] V[e][grp][c][8] for the 6-row blocks [mb_begin, mb_end) of U.
template <int kTile>
__attribute__((noinline)) void Gemms(const ConvGeometry& g, const float* u, const float* v, int64_t groups,
                                     int64_t mb_begin, int64_t mb_end, float* r) {
  constexpr int kA = Transform<kTile>::kA;
  constexpr int kE = kA * kA;
  const int64_t C = g.c, MB = (g.m + 5) / 6;
  const int64_t row_stride = groups * kE * 8, group_stride = kE * 8;
  // Channels in slices of kSliceC (U is packed slice by slice, see PackWeights), so that the slice of V[e] the
  // micro-kernel streams stays in L1 across the row blocks of U; deep layers would otherwise stream it from L2.
  for (int e = 0; e < kE; ++e) {
    const float* ve = v + e * VStrideFloats(groups, C);
    for (int64_t c0 = 0; c0 < C; c0 += kSliceC) {
      const int64_t kc = Min(kSliceC, C - c0);
      const float* us = u + (e * MB * C + c0 * MB) * kRowBlock;  // this slice: [MB][kc][6]
      for (int64_t mb = mb_begin; mb < mb_end; ++mb) {
        const float* up = us + mb * kc * kRowBlock;
        float* rm = r + (mb - mb_begin) * kRowBlock * row_stride + e * 8;
        int64_t grp = 0;
        for (; grp + 2 <= groups; grp += 2) {
          Micro<2>(up, ve + (grp * C + c0) * 8, ve + ((grp + 1) * C + c0) * 8, kc, rm + grp * group_stride,
                   row_stride, group_stride, c0 > 0);
        }
        if (grp < groups) {
          Micro<1>(up, ve + (grp * C + c0) * 8, nullptr, kc, rm + grp * group_stride, row_stride, 0, c0 > 0);
        }
      }
    }
  }
}

template <int kTile>
void OutputTransform(const ConvGeometry& g, const float* r, const float* bias, const TileCoords& tc,
                     int64_t groups, int64_t m_begin, int64_t m_end, float* y) {
  constexpr int kA = Transform<kTile>::kA;
  constexpr int kE = kA * kA;
  const int64_t M = g.m, OH = g.oh, OW = g.ow;
  bool full[kMaxBlockTiles / 8];  // whether the 8 tiles of a group lie wholly inside the output
  for (int64_t grp = 0; grp < groups; ++grp) {
    full[grp] = true;
    for (int i = 0; i < 8; ++i) {
      const int64_t t0 = grp * 8 + i;
      full[grp] = full[grp] && tc.img[t0] >= 0 && tc.oy[t0] + kTile <= OH && tc.ox[t0] + kTile <= OW;
    }
  }
  for (int64_t m = m_begin; m < m_end; ++m) {
    const float b = bias ? bias[m] : 0.0f;
    for (int64_t grp = 0; grp < groups; ++grp) {
      const float* rp = r + ((m - m_begin) * groups + grp) * kE * 8;
      V8 mt[kE], t[kTile * kA], yt[kTile * kTile];
      for (int e = 0; e < kE; ++e) mt[e] = Load(rp + e * 8);
      for (int s = 0; s < kA; ++s) Transform<kTile>::Out(mt + s, kA, t + s, kA);  // A^T m, column by column
      for (int i = 0; i < kTile; ++i) Transform<kTile>::Out(t + i * kA, 1, yt + i * kTile, 1);  // (A^T m) A
      if (full[grp]) {  // 8 whole tiles: each output row of a tile is one short store after a transpose
        for (int ii = 0; ii < kTile; ++ii) {
          V8 rows[8] = {};
          for (int jj = 0; jj < kTile; ++jj) rows[jj] = yt[ii * kTile + jj] + b;
          Transpose8(rows);
          for (int i = 0; i < 8; ++i) {
            const int64_t t0 = grp * 8 + i;
            float* out = y + ((tc.img[t0] * M + m) * OH + tc.oy[t0] + ii) * OW + tc.ox[t0];
            std::memcpy(out, &rows[i], kTile * sizeof(float));
          }
        }
        continue;
      }
      alignas(32) float buf[kTile * kTile][8];
      for (int k = 0; k < kTile * kTile; ++k) Store(buf[k], yt[k] + b);
      for (int i = 0; i < 8; ++i) {
        const int64_t t0 = grp * 8 + i;
        if (tc.img[t0] < 0) break;
        const int64_t rows = Min(kTile, OH - tc.oy[t0]), cols = Min(kTile, OW - tc.ox[t0]);
        float* out = y + ((tc.img[t0] * M + m) * OH + tc.oy[t0]) * OW + tc.ox[t0];
        for (int64_t ii = 0; ii < rows; ++ii) {
          for (int64_t jj = 0; jj < cols; ++jj) out[ii * OW + jj] = buf[ii * kTile + jj][i];
        }
      }
    }
  }
}

// Coordinates of the tiles [begin, begin + tb); returns the number of groups of 8.
template <int kTile>
int64_t Coords(const ConvGeometry& g, int64_t begin, int64_t tb, TileCoords& tc) {
  const int64_t per_image = g.TilesPerImage();
  const int64_t groups = (tb + 7) / 8;
  for (int64_t i = 0; i < groups * 8; ++i) {
    if (i >= tb) {
      tc.img[i] = -1;
      tc.oy[i] = tc.ox[i] = 0;
      continue;
    }
    const int64_t t = begin + i;
    const int64_t rem = t % per_image;
    tc.img[i] = t / per_image;
    tc.oy[i] = (rem / g.tiles_w) * kTile;
    tc.ox[i] = (rem % g.tiles_w) * kTile;
  }
  return groups;
}

template <int kTile>
void TransformT(const ConvGeometry& g, const float* x, int64_t tile_begin, int64_t tile_end, int64_t c_begin,
                int64_t c_end, float* v) {
  TileCoords tc;
  const int64_t groups = Coords<kTile>(g, tile_begin, tile_end - tile_begin, tc);
  InputTransform<kTile>(g, x, tc, groups, c_begin, c_end, v);
}

template <int kTile>
void MultiplyT(const ConvGeometry& g, const float* v, const float* u, const float* bias, float* y,
               int64_t tile_begin, int64_t tile_end, int64_t m_begin, int64_t m_end, float* r) {
  TileCoords tc;
  const int64_t groups = Coords<kTile>(g, tile_begin, tile_end - tile_begin, tc);
  Gemms<kTile>(g, u, v, groups, m_begin / kRowBlock, (m_end + kRowBlock - 1) / kRowBlock, r);
  OutputTransform<kTile>(g, r, bias, tc, groups, m_begin, m_end, y);
}

}  // namespace

void TransformInput(const ConvGeometry& g, const float* x, int64_t tile_begin, int64_t tile_end, int64_t c_begin,
                    int64_t c_end, float* v) {
  if (g.tile == 4) {
    TransformT<4>(g, x, tile_begin, tile_end, c_begin, c_end, v);
  } else {
    TransformT<2>(g, x, tile_begin, tile_end, c_begin, c_end, v);
  }
}

void MultiplyOutput(const ConvGeometry& g, const float* v, const float* u, const float* bias, float* y,
                    int64_t tile_begin, int64_t tile_end, int64_t m_begin, int64_t m_end, float* r) {
  if (g.tile == 4) {
    MultiplyT<4>(g, v, u, bias, y, tile_begin, tile_end, m_begin, m_end, r);
  } else {
    MultiplyT<2>(g, v, u, bias, y, tile_begin, tile_end, m_begin, m_end, r);
  }
}

}  // namespace WINOGRAD_ISA
}  // namespace winograd
}  // namespace onnxopt
