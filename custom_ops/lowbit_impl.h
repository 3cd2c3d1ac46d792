// The LowBitMatMul loops written once in plain C++ and compiled twice: lowbit.cc (portable) and
// lowbit_avx2.cc (-mavx2 -mfma, where the compiler vectorizes them). Included inside a namespace of each.
#pragma once

#include <algorithm>

#include "lowbit.h"

namespace onnxopt {
namespace lowbit {
namespace LOWBIT_IMPL {

// Any bit width: per chunk, unpack to bytes, then a float dot product with x.
inline void GemvGeneric(const Weights& w, const float* x, const float* sumx, int64_t n0, int64_t n1, float* y) {
  const int64_t chunk_bytes = 4 * w.bits, per_group = w.group / kChunk;
  uint8_t q[kChunk];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = w.codes.data() + n * w.col_bytes;
    const float* sc = w.scale.data() + n * w.groups;
    const float* sz = w.scale_zero.data() + n * w.groups;
    float total = 0.0f;
    for (int64_t g = 0; g < w.groups; ++g) {
      float acc[kChunk] = {};
      for (int64_t c = 0; c < per_group; ++c, p += chunk_bytes) {
        UnpackChunk(p, w.bits, q);
        const float* xc = x + (g * per_group + c) * kChunk;
        for (int j = 0; j < kChunk; ++j) acc[j] += static_cast<float>(q[j]) * xc[j];
      }
      float s = 0.0f;
      for (int j = 0; j < kChunk; ++j) s += acc[j];
      total += sc[g] * s - sz[g] * sumx[g];
    }
    y[n] = total;
  }
}

inline void Dequant(const Weights& w, int64_t n0, int64_t cols, float* tile) {
  const int64_t chunk_bytes = 4 * w.bits, chunks = w.kp / kChunk, per_group = w.group / kChunk;
  std::fill(tile, tile + w.kp * kTile, 0.0f);
  uint8_t q[kChunk];
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t n = n0 + c;
    const uint8_t* p = w.codes.data() + n * w.col_bytes;
    for (int64_t ch = 0; ch < chunks; ++ch, p += chunk_bytes) {
      UnpackChunk(p, w.bits, q);
      const int64_t g = ch / per_group;
      const float s = w.scale[n * w.groups + g], sz = w.scale_zero[n * w.groups + g];
      float* t = tile + ch * kChunk * kTile + c;
      for (int j = 0; j < kChunk; ++j) t[j * kTile] = s * static_cast<float>(q[j]) - sz;
    }
  }
}

// Four rows at a time share each tile load; each row's 8 sums are one vector register after vectorization.
inline void Tile(const float* x, int64_t ldx, int64_t rows, const float* tile, int64_t kp, float* y, int64_t ldy,
                 int64_t cols) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    float a0[kTile] = {}, a1[kTile] = {}, a2[kTile] = {}, a3[kTile] = {};
    const float *x0 = x + r * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
    for (int64_t k = 0; k < kp; ++k) {
      const float* t = tile + k * kTile;
      for (int c = 0; c < kTile; ++c) {
        a0[c] += x0[k] * t[c];
        a1[c] += x1[k] * t[c];
        a2[c] += x2[k] * t[c];
        a3[c] += x3[k] * t[c];
      }
    }
    for (int64_t c = 0; c < cols; ++c) {
      y[r * ldy + c] = a0[c];
      y[(r + 1) * ldy + c] = a1[c];
      y[(r + 2) * ldy + c] = a2[c];
      y[(r + 3) * ldy + c] = a3[c];
    }
  }
  for (; r < rows; ++r) {
    float a[kTile] = {};
    const float* xr = x + r * ldx;
    for (int64_t k = 0; k < kp; ++k) {
      for (int c = 0; c < kTile; ++c) a[c] += xr[k] * tile[k * kTile + c];
    }
    for (int64_t c = 0; c < cols; ++c) y[r * ldy + c] = a[c];
  }
}

}  // namespace LOWBIT_IMPL
}  // namespace lowbit
}  // namespace onnxopt
